"""Recipes other than `shapes` (whose defaults are the dataclass defaults in config.py), and `--smoke`.

`tiny`: the shapes pipeline at toy sizes, for tests. `pretrained`: the defaults for `nitrofusion train --from
MODEL`, an SDXL or SD1.x model on GPUs. `smoke(cfg)`: any recipe cut to a few iterations and a handful of cache
pairs, keeping its micro-batch sizes, so a full-size run's memory is checked too before a long job.
"""

from __future__ import annotations

from dataclasses import replace

from .config import (
    AutoencoderConfig,
    CacheConfig,
    DataConfig,
    InitConfig,
    NitroConfig,
    OptimConfig,
    PoolConfig,
    PreviewConfig,
    RunConfig,
    TeacherConfig,
    TextConfig,
    TrainConfig,
    UNetConfig,
)


def _tiny() -> TrainConfig:
    """Toy sizes: 32x32 images, 4x4 latents, a few steps per stage. For tests and smoke runs only."""
    def opt(steps: int = 2, batch: int = 2, **kw) -> OptimConfig:
        return OptimConfig(steps=steps, batch_size=batch, warmup=0, checkpoint_every=1, log_every=1, **kw)

    return TrainConfig(
        recipe="tiny",
        data=DataConfig(image_size=32),
        # 6 latent channels: neither SD's 4 nor the shapes recipe's 8, so a hard-coded channel count fails the smoke tests
        autoencoder=AutoencoderConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, crop_size=16, latent_channels=6,
                                      optim=opt()),
        text=TextConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, max_length=24, optim=opt()),
        teacher=TeacherConfig(unet=UNetConfig(block_out_channels=(8, 16), attention_head_dim=4, norm_num_groups=4,
                                              cross_attn=(False, True)), sample_steps=2, latent_pool=6,
                              optim=opt(decay_steps=1)),
        cache=CacheConfig(num_pairs=4, batch_size=2),
        init=InitConfig(optim=opt()),
        nitro=NitroConfig(pool=PoolConfig(heads_per_slot=2, head_channels=8, refresh_fraction=0.05),
                          phase_steps=(1, 1), optim=opt(steps=0)),
        preview=PreviewConfig(channels=4, blocks=(1, 0, 0, 0), pairs=4, eval_pairs=2, optim=opt(batch=2)),
        run=RunConfig(device="cpu"),
    )


def _shapes16() -> TrainConfig:
    """The shapes recipe on 16x16 latents (issue 15: 8x8x4 latents of the 8x-down autoencoder cannot hold a small
    striped or checkered object). Each choice measured on this CPU, 2026-11-30 (docs/training.md, "16x16 latents"):
    - autoencoder 4x down (16, 32, 64): its reconstructions pass the detector 98.8% (8x down: 81.5%);
    - UNet (32, 32, 64, 128), cross-attention at 4x4 and 2x2: the first level at 32 channels, not 16, made a better
      teacher, +4.4 [+3.0, +5.9] points paired on the eval set (small striped objects 76% -> 87%) and a better
      student, +5.4 [+3.8, +7.1] at 1 step and +5.1 at 4, for 1.23x the cost of a training step (docs/training.md,
      round 13); (16, 32, 64, 128) cost 0.98x the 8x8 UNet's;
    - teacher trained with offset noise 0.1 and Min-SNR (gamma 5): without offset noise the 16x16 teacher drew the
      wrong background 80% of the time (alignment 8-10%, with or without Min-SNR); with both, 84.0% at 25 steps,
      guidance 3, against 63.0% for the 8x8 teacher (the same 400 eval prompts). At 13,000 steps plain epsilon MSE
      with offset noise scored 2.6 points under gamma 5 on 1,000 validation prompts, -2.4 [-4.0, -0.8] on the eval
      set, worse on the patterned objects too (docs/training.md, round 12);
    - a cache of 8192 teacher samples (from 1024) and a 3000-step one-step init (from 600): the init's 1-step
      alignment rose to 78.4% (teacher 83.8%, 2,000 images); 6000 steps with a decaying tail since round 11;
    - stage 3's pool (round 15): matching-aware conditional heads on the whole image at t* 10, on five encoder
      levels, fed 128 rows an update from replayed fakes. The pools before it (the paper's 4 t* x 3 tasks; from
      round 2 to 14 the local unconditional heads at a third of the weight, 4 updates an iteration) never beat the
      no-discriminator control beyond the interval across seeds: their heads sat at chance on fresh latents
      (rounds 8-9). This one does at 4 steps in all four runs measured and at 1 step in two of them (+1.0, +1.2;
      round 15's bundled run +0.8 and round 16's +0.6, inside).
    It makes the bundled model (trainer.config.BUNDLED_RECIPE) since 2026-11-30: against the 8x8 `shapes` model it
    draws more prompts right at 1 and 4 steps, and its latents hold the checks and stripes (EVAL.md). The model
    bundled since 2026-12-03 (rounds 19-20) is this recipe's: round 16's uninterrupted run (72.8 minutes on a 2-core
    CPU on a fast day), its stage 3 rerun with the distribution-matching term and the heads at weight 3 (AdamW's
    per-tensor loop then; the recipe has used the fused kernel since round 21). The recipe as it stands took 77.3
    minutes in one run on that CPU (round 21), where issue 15 allows 90; that run's model drew 3.5 points fewer
    validation prompts right at 1 step than the bundled one, the spread of the whole chain (BENCHMARKS.md;
    docs/training.md, round 21)."""
    cfg = TrainConfig(recipe="shapes16")
    cfg.autoencoder = AutoencoderConfig(block_out_channels=(16, 32, 64), kl_weight=1e-4)
    cfg.teacher = TeacherConfig(unet=UNetConfig(block_out_channels=(32, 32, 64, 128), norm_num_groups=8,
                                                cross_attn=(False, False, True, True)),
                                min_snr_gamma=5.0, offset_noise=0.1)
    # 13,000 steps, the last 1,000 with the lr decaying to 0 (a half cosine), not a constant lr to 10,000. At a
    # constant lr the same run scored 83.0 / 87.2 / 84.8% at 8,000 / 10,000 / 12,000 steps on 1,000 validation
    # prompts (bench/teacher_guidance.py --validation): one draw from where the optimizer wanders, ~4 points apart.
    # 1,000 decaying steps after 12,000: 90.1% (+2.9 [+0.7, +4.9] over 10,000), shapes-FID 35.3 vs 41.1; a fresh
    # 10,000-step run decaying over its last 2,000 scored 87.1%. The 3,000 more steps cost about 10 minutes on a
    # 2-core CPU: the whole recipe about 85, estimated (BENCHMARKS.md; docs/training.md, rounds 5 and 6).
    cfg.teacher.optim = replace(cfg.teacher.optim, steps=13000, decay_steps=1000)
    cfg.cache = CacheConfig(num_pairs=8192)
    # 6,000 steps, the last 1,000 with the lr decaying to 0, not 3,000 at a constant lr: +2.9 [+1.6, +4.1] points at
    # 1 step for the init, +2.9 [+1.7, +4.2] for the control's stage 3 over it, shapes-FID -1.24 (paired, round 7's
    # base, 2,000 images); 8-10 minutes more on a 2-core CPU (BENCHMARKS.md; docs/training.md, rounds 10 and 11).
    cfg.init = InitConfig(optim=OptimConfig(steps=6000, batch_size=32, lr=1e-4, warmup=20, decay_steps=1000))
    # seed 1: of the stage-3 seeds from the same init, the one bench/pick_run.py chose on 1,000 validation images
    # that `nitrofusion eval` never uses. reg_multistep "teacher": k-step iterations anchored to the teacher's own
    # sample from the student's re-noised input; against "off", paired, seeds 1 / 2: 4 steps +10.7 / +7.7 points
    # (80.6% / 78.8%), 1 step -2.5 / -3.4 with a better FID (38.7 vs 40.7), so 4 steps beat 1 (docs/training.md,
    # round 3).
    # The pool since round 15: matching-aware heads (nitro.pool.mismatch=1: a real shown with another row's prompt
    # is a fake too), whole image with the prompt, only at t* 10, at the encoder levels where a head can tell the
    # teacher's samples from the student's (bench/head_learnability.py --per-level: 0.65-0.67 at levels 0-3 and 5),
    # 7 iterations' fakes replayed so each update reads 128 rows, one update per iteration, weight 1. Against the
    # same schedule with the signal off, two stage-3 seeds, paired, 2,000 images: 1 step +1.0 [+0.1, +1.9] and +1.2
    # [+0.1, +2.1] points, 4 steps +1.5 / +1.1, beyond the intervals (round 15's bundled run: +0.8, inside, at 1
    # step, +1.4 at 4); the local unconditional heads at 0.33 it replaces were even with that control (-0.1
    # [-0.6, +0.4]). Stage 3 costs 1.56x, 1.3x since its encoder stops at level 5 (docs/training.md, rounds 15 and
    # 16; BENCHMARKS.md). Round 16's run (bundled until round 19), over a stronger init: +0.6 at 1 step (inside), +0.6 at 4 (beyond).
    cfg.nitro = NitroConfig(pool=PoolConfig(refresh_fraction=0.001, tasks=("global_cond",), timesteps=(10,),
                                            levels=(0, 1, 2, 3, 5), replay=7, mismatch=1.0),
                            # adv_weight 3 (round 20): beside the DMD term, three times the heads' weight kept
                            # the 1-step alignment (+0.0 [-0.8, +0.9], 1,000 validation prompts; -0.2 on the 2,000
                            # eval images) and gave back part of the DMD term's shapes-FID (-0.77 [-1.37, -0.13] on
                            # the eval set); 5 lost 1.2 points for no FID, 10 broke the student (-7.7 points).
                            disc_steps=1, adv_weight=3.0, reg_multistep="teacher", seed=1,
                            # DMD2's distribution-matching term since round 19: the L2 anchor capped the 1-step
                            # student at its init's alignment. Its fake score is updated 3 times an iteration (DMD2:
                            # 5; three scored as five did on the validation prompts, 95.5% / 95.3%). Two runs (five
                            # updates, adv_weight 1) over round 16's stages, paired against it on the 2,000 eval
                            # images: 1 step +1.8 [+0.7, +2.9] and +1.4 [+0.3, +2.6] points, 2-3 steps +1.2 to
                            # +2.0, 4 steps even; the price, a 1-step shapes-FID 3.4-3.7 worse (1.44x the teacher's,
                            # from 1.26x; 1.40x with the heads at 3), 4 steps even. With it the pool earns its place:
                            # against the same schedule without the heads' signal, shapes-FID -3.22 [-4.19, -2.38]
                            # at 1 step and -0.81 [-1.55, -0.11] at 4 (paired; heads at 1: -1.99 and -0.38). Stage 3
                            # costs about 1.8x the schedule without the term.
                            dmd_weight=3.0, dmd_fake_steps=3)
    cfg.preview = PreviewConfig(blocks=(2, 2, 1))  # one block count per decoder level: three levels at 4x down
    return cfg


def _pretrained() -> TrainConfig:
    """`--from MODEL` on GPUs. From the paper (docs/nitrofusion-method.md, "Training"): AdamW, micro-batch 5 x 20
    accumulation (effective 100 on one card), a 480-head pool for SDXL's 10 feature levels (4 t* x 10 x 3 tasks x
    4 replicas), 1% refresh, shift 250, the adversarial loss only (nitro.reg_weight 0), teacher samples as reals.
    Choices where the paper gives none (not measured at this scale; README "Train your own NitroSD-style
    student"): the learning rates, the iteration counts, DPM-Solver++ 25 steps at guidance 5 for an undistilled
    teacher, the regression init's length when no --init-unet is given."""
    return TrainConfig(
        recipe="pretrained",
        data=DataConfig(image_size=0),  # the model's native size
        teacher=TeacherConfig(sample_steps=25, guidance_scale=5.0, latent_pool=4096),
        cache=CacheConfig(num_pairs=0, batch_size=8, store_embeddings=True),
        init=InitConfig(optim=OptimConfig(steps=2000, batch_size=4, grad_accum=4, lr=1e-5, warmup=100,
                                          checkpoint_every=250),
                        gradient_checkpointing=True),
        # The paper's pool: 1% refresh, one discriminator update per generator update (the shapes recipe's 0.1% and
        # 4 updates are for its 84 small heads and short run).
        nitro=NitroConfig(pool=PoolConfig(heads_per_slot=4, head_channels=64, refresh_fraction=0.01),
                          phase_steps=(2000, 500, 500, 500), disc_steps=1, lr_disc=1e-4, reg_weight=0.0,
                          gradient_checkpointing=True,
                          optim=OptimConfig(steps=0, batch_size=5, grad_accum=20, lr=1e-6, warmup=100,
                                            checkpoint_every=100)),
    )


PRESETS = {"shapes16": _shapes16, "tiny": _tiny, "pretrained": _pretrained}


def _smoke_optim(o: OptimConfig, steps: int = 2) -> OptimConfig:
    # The micro-batch stays: on a GPU the smoke run then also shows whether the full run's activations fit.
    return replace(o, steps=steps, grad_accum=min(o.grad_accum, 2), warmup=0, decay_steps=min(o.decay_steps, 1),
                   checkpoint_every=1, log_every=1)


def smoke(cfg: TrainConfig) -> TrainConfig:
    """`--smoke`: every stage runs two iterations (stage 3: one per bottom-up phase, so every step count runs),
    the cache holds 4 pairs in 2 chunks, accumulation at most 2 micro-batches, torch on one CPU thread."""
    d = TrainConfig.from_dict(cfg.to_dict())  # a copy
    d.autoencoder.optim = _smoke_optim(d.autoencoder.optim)
    d.text.optim = _smoke_optim(d.text.optim)
    d.teacher.optim = _smoke_optim(d.teacher.optim)
    d.teacher.latent_pool = min(d.teacher.latent_pool, 8)
    d.cache.num_pairs, d.cache.batch_size = 4, 2
    d.init.optim = _smoke_optim(d.init.optim)
    d.nitro.optim = _smoke_optim(d.nitro.optim, steps=0)
    d.nitro.snapshot_every = 0
    d.nitro.phase_steps = (1,) * len(d.nitro.phase_steps)
    # One CPU thread unless set: a smoke model is per-op overhead, and threads fighting over shared cores cost
    # 16x (tiny SDXL --smoke on this 2-core CPU under load: 3 min 17 s with torch's default, 12 s with 1).
    d.run.threads = d.run.threads or 1
    return TrainConfig.from_dict(d.to_dict())  # validated again (NitroConfig recomputes its step total)
