"""The per-stage sections of the trainer's config (trainer/config.py assembles them into TrainConfig and
re-exports them): data, optimiser, the autoencoder, text encoder, teacher, cache, init, NitroFusion and preview
stages. Each dataclass validates itself at construction with a message that says how to fix the value."""

from __future__ import annotations

from dataclasses import dataclass, field

SOLVERS = ("dpmsolver++", "euler", "ddim", "lcm")
TASKS = ("global_cond", "local_cond", "local_uncond")
DISC_TIMESTEPS = (10, 250, 500, 750)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class DataConfig:
    # 64, not 128: measured on the 2-core CPU, the 128 recipe's teacher alone needs hours (README "Training").
    # 0: the --from model's native size (1024 for SDXL, 512 for SD1.5), resolved when the model loads.
    image_size: int = 64
    seed: int = 0
    heldout_fraction: float = 0.1  # of (colour, shape, background) combinations, never trained on

    def __post_init__(self):
        _check(self.image_size == 0 or (self.image_size % 8 == 0 and self.image_size >= 32),
               "data.image_size must be a multiple of 8, >= 32 (or 0: the model's native size)")
        _check(0 <= self.heldout_fraction < 0.5, "data.heldout_fraction must be in [0, 0.5)")


@dataclass
class OptimConfig:
    """One training loop: steps, batch, AdamW, accumulation, checkpoint cadence."""

    steps: int = 1000
    batch_size: int = 32  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100
    # Warm-up, stable, decay: the last `decay_steps` steps take the lr down to 0 along a half cosine (0: constant
    # to the end; more than `steps` decays the whole run). The decayed end state averages out the constant-lr
    # noise in the weights, as an EMA would.
    decay_steps: int = 0
    grad_clip: float = 1.0
    # "adamw8bit": bitsandbytes' 8-bit AdamW (optional install) for the trained network; what lets an SDXL student
    # with its optimizer state fit beside the frozen teacher encoder on one card.
    optimizer: str = "adamw"
    # AdamW's fused kernel (one pass over every parameter) instead of torch's per-tensor loop; the same update up to
    # float rounding. On this 2-core CPU a step of the shapes16 UNet's 4.2M parameters (364 tensors) takes 3.5 ms
    # against 13.0, a teacher training step 0.933x (bench/optimizer_step.py, BENCHMARKS.md). Applies to every AdamW a stage
    # makes from this config (stage 3: the student's, the heads', the DMD fake score's); not to adamw8bit.
    fused: bool = True
    checkpoint_every: int = 200
    # The checkpoint at the last step: only to continue a finished stage (remove its DONE file, raise `steps`). At
    # SDXL size it is ~31 GB beside the stage's ~10 GB output (fp32 student and AdamW state), so a run short of
    # disk can leave it out; a run killed before the stage's output is written then resumes from the one before.
    checkpoint_final: bool = True
    log_every: int = 10

    def __post_init__(self):
        self.betas = tuple(self.betas)  # JSON gives a list
        _check(self.steps >= 0, "steps must be >= 0")
        _check(self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1")
        _check(self.lr > 0, "lr must be > 0")
        _check(self.decay_steps >= 0, "decay_steps must be >= 0")
        _check(self.optimizer in ("adamw", "adamw8bit"), "optim.optimizer must be adamw or adamw8bit")
        _check(self.checkpoint_every >= 1 and self.log_every >= 1, "checkpoint_every and log_every must be >= 1")


@dataclass
class AutoencoderConfig:
    """Stage 0a: AutoencoderKL, 8x down (four blocks) or 4x down (three), trained on dataset images (L1 + L2 + KL)."""

    block_out_channels: tuple[int, ...] = (8, 16, 32, 64)  # thin at full resolution: that is where FLOPs go
    layers_per_block: int = 1
    # 8 was tried (2026-11-26): reconstructions 81% vs 76.5% through the detector, but the teacher trained on those
    # latents fell from 67% to 18% alignment (README, 'What limits it'). 4 stays.
    latent_channels: int = 4
    # 2 groups, not 8: with one channel per group GroupNorm erases a flat region's colour (each channel is
    # normalised to zero over the image), and the autoencoder could not learn the background (measured).
    norm_num_groups: int = 2
    mid_attention: bool = False  # without it the network is fully convolutional, so crop training is exact
    kl_weight: float = 1e-6
    crop_size: int = 32  # train on random crops of this side (4x cheaper than 64x64 for the same steps); 0 = off
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=4000, batch_size=32, lr=2e-3, warmup=50,
                                                                   checkpoint_every=500))

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        _check(len(self.block_out_channels) in (3, 4),
               "autoencoder.block_out_channels needs 4 entries (8x down) or 3 (4x down)")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels),
               "autoencoder.block_out_channels must be multiples of norm_num_groups")
        _check(self.crop_size % self.scale_factor == 0 and self.crop_size >= 0,
               f"autoencoder.crop_size: a multiple of {self.scale_factor} (0 = off)")

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel: every block but the last halves the side (diffusers' AutoencoderKL)."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class TextConfig:
    """Stage 0b: CLIP text encoder over a byte-level BPE tokenizer whose merges spell the grammar's words.

    Trained by attribute probing: linear heads on the pooled (EOS) state predict size, colour, fill, shape,
    position and background. Any other text still tokenises, byte by byte.
    """

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=600, batch_size=64, lr=1e-3, warmup=50))

    def __post_init__(self):
        _check(self.hidden_size % self.num_heads == 0, "text.hidden_size must be divisible by text.num_heads")
        _check(self.max_length >= 24, "text.max_length must be >= 24 (the longest grammar prompt is ~16 tokens)")


@dataclass
class UNetConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    norm_num_groups: int = 16  # block widths must be multiples of it
    cross_attn: tuple[bool, ...] = (False, True, True)  # per down block (up blocks mirror it)

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.cross_attn = tuple(self.cross_attn)
        _check(len(self.cross_attn) == len(self.block_out_channels), "unet.cross_attn needs one flag per block")


@dataclass
class TeacherConfig:
    """Stage 1: epsilon-prediction diffusion (SDXL's scaled_linear betas), sampled with DPM-Solver++."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    cond_dropout: float = 0.1  # empty prompt this often, for classifier-free guidance
    sample_steps: int = 25
    guidance_scale: float = 3.0  # 1: no classifier-free guidance (one UNet call per step; distilled teachers)
    # How the teacher samples its "real" x0 (stage 2's cache, stage 3's k-step targets): dpmsolver++ (2nd-order
    # multistep), euler, ddim (trailing spacing) or lcm (a consistency/DMD2-style few-step teacher: x0, re-noise).
    solver: str = "dpmsolver++"
    # A few-step distilled teacher's own timesteps, e.g. [999, 749, 499, 249] for 4-step DMD2 (the paper's
    # Realism teacher) with solver=lcm and guidance_scale=1; empty: `sample_steps` trailing-spaced steps.
    timesteps: tuple[int, ...] = ()
    latent_pool: int = 12288  # dataset images VAE-encoded once and reused (0: encode every batch on the fly)
    gradient_checkpointing: bool = False
    # Epsilon MSE weights x0 errors by the SNR, so at high noise (where the background and layout are decided) the
    # loss barely cares. min_snr_gamma > 0: weight each row by min(SNR, gamma) / SNR (Hang et al. 2023, "Min-SNR"),
    # which moves the weight toward high noise. 0: plain epsilon MSE. shapes16 uses 5: its 13,000-step teacher with
    # 0 scored 2.4 [0.8, 4.0] points lower on 2,000 eval prompts, FID 23.8 vs 19.4 (docs/training.md, round 12).
    min_snr_gamma: float = 0.0
    # > 0: add this times a per-channel constant N(0, 1) to the training noise ("offset noise"), so the image-wide
    # mean of a noisy latent does not give the background away and the prompt has to.
    offset_noise: float = 0.0
    # How often the teacher draws a latent-pool image whose object is small and striped or checkered, relative to
    # the others (1: uniform, the pool as the dataset draws it; 2: those cells' share goes from 1/3 to 1/2). They
    # are the cells the teacher misses (docs/training.md, rounds 10 and 13); a weight > 1 spends more of the same
    # steps on them. Needs teacher.latent_pool > 0. Measured at 2 (round 26, one run, 2,000 eval images, paired
    # against the recipe over the same stages 0-1): teacher +0.7 [-0.5, +1.8] (small striped +9.4, small checkered
    # -3.3), init +1.8 [+0.5, +3.1]; the 1-step student against the recipe's stage 3 over the same stages -0.2
    # points, shapes-FID +0.9 (unpaired; round 26 first compared it with a [20, 600] stage 3). Not adopted.
    small_patterned_weight: float = 1.0
    # > 0: keep an exponential moving average of the teacher (torch AveragedModel, updated every optimizer step) and
    # save it as teacher/unet, the weights every later stage samples from (the trained weights: teacher/unet_raw).
    # With a constant lr the last step's weights are one draw from where the optimizer wanders; 0: off. Measured on
    # shapes16 (2026-11-30, one 8000-step run, 2,000 eval prompts, paired against its own trained weights, 83.5% /
    # FID 32.1): decay 0.999 84.5% / FID 42.1, 0.9995 81.0% / 59.8, 0.9998 1.7%: the weights still move too fast
    # at 8000 steps for an average of them to be a model. Not adopted (docs/training.md, round 5).
    ema_decay: float = 0.0
    # The default is a constant lr to the end; shapes16 decays it over its last 1,000 of 13,000 steps (presets.py).
    # On the 8x8 `shapes` recipe `--set teacher.optim.decay_steps=1500` was measured (2026-11-26, the whole recipe
    # from the same autoencoder, 400 eval prompts each): teacher alignment 63.0% -> 65.8% and the 1-step student
    # 57.2% -> 59.8%, but the student's shapes-FID 86.8 -> 96.7 (the teacher's 96.2 -> 102.1), so `shapes` keeps it off.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=8000, batch_size=32, lr=3e-4,
                                                                   checkpoint_every=500))

    def __post_init__(self):
        self.timesteps = tuple(self.timesteps)
        _check(0 <= self.cond_dropout < 1, "teacher.cond_dropout must be in [0, 1)")
        _check(self.min_snr_gamma >= 0 and self.offset_noise >= 0, "teacher.min_snr_gamma, offset_noise: >= 0")
        _check(self.small_patterned_weight > 0, "teacher.small_patterned_weight must be > 0")
        _check(self.small_patterned_weight == 1 or self.latent_pool > 0,
               "teacher.small_patterned_weight weights the latent pool's draws: set teacher.latent_pool > 0")
        _check(0 <= self.ema_decay < 1, "teacher.ema_decay must be in [0, 1)")
        _check(1 <= self.sample_steps <= 1000, "teacher.sample_steps must be in [1, 1000]")
        _check(self.solver in SOLVERS, f"teacher.solver must be one of {', '.join(SOLVERS)}")
        _check(all(0 <= t < 1000 for t in self.timesteps) and list(self.timesteps) == sorted(self.timesteps)[::-1]
               and len(set(self.timesteps)) == len(self.timesteps), "teacher.timesteps: distinct, descending, in [0, 1000)")
        _check(not (self.timesteps and self.solver == "ddim"), "teacher.timesteps: not with solver=ddim (fixed spacing)")


@dataclass
class CacheConfig:
    """Stage 2a: (noise, prompt) -> teacher x0 pairs, generated once into chunk files that the later stages read
    memory-mapped, a batch of rows at a time (trainer/cache.py); also the 'real' samples of stage 3."""

    num_pairs: int = 1024  # 0: one pair per prompt of the --prompts file
    batch_size: int = 64  # pairs per chunk file (and per teacher sampling batch)
    # Also store each pair's text conditioning (fp16) in its chunk, so later stages never run the text encoders
    # and no per-prompt cache grows in memory. Off for the shapes recipe: its grammar's prompts are a bounded set
    # encoded live, as the committed model was trained.
    store_embeddings: bool = False
    # How often the init and stage 3 draw a cached pair whose prompt names a small striped or checkered object,
    # relative to the others (1: uniform; 2: those cells' share goes from 1/3 to 1/2). The cache is unchanged, only
    # its draws. The students' weakest cells are the teacher's (docs/training.md, round 26: the same weight on the
    # teacher's draws moved the init +1.8); shapes grammar prompts only. Round 27, w = 2 over one teacher, stage 3
    # seed 1: 1-step shapes-FID -11.6 and -12.2 (paired), and weighting the init too cost 1.7 points. Round 28: that
    # gain was the draw sequence (w != 1 draws with torch.multinomial, so other batches): with stage 3 seed 2 the
    # recipe draws 28.2 at w = 1 and w = 2 costs 1.9 shapes-FID (+0.1 points). So 1.
    small_patterned_weight: float = 1.0

    def __post_init__(self):
        _check(self.num_pairs >= 0 and self.batch_size >= 1, "cache.num_pairs must be >= 0, cache.batch_size >= 1")
        _check(self.small_patterned_weight > 0, "cache.small_patterned_weight must be > 0")


@dataclass
class InitConfig:
    """Stage 2b: one-step initialisation by regression of the student's one-step x0 on the teacher's x0."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=600, batch_size=32, lr=1e-4, warmup=20))
    gradient_checkpointing: bool = False
    # > 0: add a perceptual term, the squared distance between the frozen teacher encoder's features of the student's
    # x0 and of the teacher's (both noised with one noise to a level drawn from feature_timesteps, prompt-conditioned,
    # each feature vector scaled to unit length as LPIPS does), times this weight, averaged over the levels. Why:
    # latent MSE regresses to the mean of what the student cannot tell apart and blurs thin stripes and corners
    # (round 18); a loss in a network's features is what made one-step regression sharp in Diffusion2GAN
    # (E-LatentLPIPS, Kang et al. 2024). The teacher's encoder is the feature space the pool's heads read.
    # Measured (docs/training.md, round 24): at 100 and 1000 over levels (10, 250), 3,000 steps continuing the
    # recipe's init, the init +0.6 and +0.0 points, the student over the first +0.4 at 1 step, all inside the
    # paired intervals; so 0 (off) in the recipe. The term costs 1.3x per init step.
    feature_weight: float = 0.0
    feature_timesteps: tuple[int, ...] = DISC_TIMESTEPS

    def __post_init__(self):
        self.feature_timesteps = tuple(self.feature_timesteps)
        _check(self.feature_weight >= 0, "init.feature_weight must be >= 0")
        _check(bool(self.feature_timesteps) and all(0 <= t < 1000 for t in self.feature_timesteps),
               "init.feature_timesteps: at least one, each in [0, 1000)")


@dataclass
class PoolConfig:
    """The discriminator head pool (paper Sec. 3.2). Ablations are switches here."""

    timesteps: tuple[int, ...] = DISC_TIMESTEPS  # t*: each head is an expert for one
    tasks: tuple[str, ...] = TASKS  # global-only ablation: ("global_cond",); cond-only: drop local_uncond
    # The frozen encoder's feature levels that get heads (indices, 0 = the first); empty: every level. Why: with
    # reduce "mean" a head at a level that cannot tell the two sides apart still takes its share of the adversarial
    # weight; bench/head_learnability.py --per-level says which levels can.
    levels: tuple[int, ...] = ()
    # Heads per (t*, feature level, task); pool = |t*| x levels x |tasks| x this. 1 for the shapes recipe: a head
    # is trained only when its t* is drawn (1/4 of iterations) and its replica sampled (1/this), while 1% of the
    # pool is reset every iteration; with 4 replicas a head saw ~7 updates before its reset and the pool stayed
    # at chance (loss_d 1.396 = 2 ln 2 after 100 iterations, measured). With 1 it sees ~20.
    heads_per_slot: int = 1
    single_head: bool = False  # ablation: one head (mid-block features, global, conditional) for every t*
    refresh_fraction: float = 0.01  # share of the whole pool re-initialised every iteration (0: no refresh)
    crop_fraction: float = 0.5  # local heads read random crops of this side (in latent pixels), own encoder pass
    head_channels: int = 32
    # Each head layer's normalisation: "group" (DMD2's GroupNorm; one group, a per-image layer norm, on maps under
    # 16 px) or "none". Why "none" exists: a linear probe on the encoder's per-channel means and stds tells the
    # shapes16 student from the dataset (AUC up to 0.80) where the GroupNorm heads cannot (0.51); a per-image norm
    # removes the image-wide feature scale. Measured (docs/training.md, round 8): without it the heads still could
    # not rank fresh dataset latents above the student's (AUC 0.52), so "group" stays the default.
    head_norm: str = "group"
    # "patch": DMD2's strided conv heads, a logit per small patch of the feature map. "stats": one logit per image
    # from each channel's mean and std over the map, through a 2-layer MLP (trainer/discriminator.py StatsHead;
    # head_channels is its width, head_norm and min_map do not apply). Why "stats" exists: a converged linear probe
    # on those statistics separates the shapes16 student from the dataset where the patch heads cannot (round 8).
    # Measured (docs/training.md, round 9): they learn a little more than patch heads in the same slots (AUC 0.57
    # against 0.55) and the student they train is the control's, within the intervals; "patch" stays the default.
    head_kind: str = "patch"
    # > 0: the heads' updates also see the fakes of the last this-many iterations (detached, with their prompts),
    # against as many more reals, so each update reads (1 + this) x the rows. Why: on fixed features a head
    # trained on 128 rows per update reaches a held-out AUC of 0.67 / 0.86 (median / best level) where 16 rows give
    # 0.59 / 0.81 (bench/head_learnability.py, docs/training.md round 9). Costs (1 + this) x the encoder work of
    # each update: pair it with fewer nitro.disc_steps. Not checkpointed: a resumed run starts with no past fakes.
    # Measured on shapes16 (round 9, replay 7, one update per iteration): the first heads that separate fresh dataset
    # latents from the student's (AUC 0.67), but they separate the teacher's samples as well (0.64), and the student
    # they train is no better than the control (-0.4 at 1 step, -1.9 and -2.4 points at 2 and 3). Off by default;
    # the shapes16 recipe's matching-aware pool uses 7 (round 15).
    replay: int = 0
    min_map: int = 2  # heads stride down to this side before the 1x1 logit conv
    # How the sampled heads' losses combine, in both the generator's and the heads' loss. "mean" (the shapes
    # recipe's): the adversarial term weighs as one head against nitro.reg_weight x L2, whatever the subset size.
    # "sum" (the paper's reading, Sec. 3.2): it grows with the subset (21 heads here). The heads' own updates barely
    # change (AdamW is scale-free per parameter, and each head's parameters see only its own term); the generator's
    # adversarial gradient is what grows.
    reduce: str = "mean"
    # > 0: the conditional heads also learn to call a real image with another row's prompt fake (a "matching-aware"
    # discriminator, Reed et al. 2016): their fake side is (fakes + this x mismatched reals) / (1 + this). Not in
    # the paper (0, the default). On the shapes16 recipe the heads sat at chance on 1-step fakes even at t* = 10: a
    # wrongly filled or coloured object is a plausible image for some other prompt, and nothing taught them to
    # read the prompt. Measured (docs/training.md, round 15): with whole-image heads at t* 10 only, replayed fakes
    # (replay 7) and weight 1, the student beats its no-discriminator control beyond the paired interval at 4 steps
    # in four runs (+0.6 to +1.5 points; rounds 15 and 16) and at 1 step in two of them (+1.0, +1.2; the others
    # +0.8 and +0.6, inside); the shapes16 recipe's pool since then.
    mismatch: float = 0.0

    def __post_init__(self):
        self.timesteps = tuple(self.timesteps)
        self.tasks = tuple(self.tasks)
        self.levels = tuple(self.levels)
        _check(all(0 <= t < 1000 for t in self.timesteps) and self.timesteps, "nitro.pool.timesteps in [0, 1000)")
        _check(bool(self.tasks) and all(t in TASKS for t in self.tasks), f"nitro.pool.tasks: choose from {TASKS}")
        _check(all(lv >= 0 for lv in self.levels) and len(set(self.levels)) == len(self.levels),
               "nitro.pool.levels: distinct indices >= 0 (empty: every level)")
        _check(self.heads_per_slot >= 1, "nitro.pool.heads_per_slot must be >= 1")
        _check(0 <= self.refresh_fraction < 1, "nitro.pool.refresh_fraction must be in [0, 1)")
        _check(0 < self.crop_fraction <= 1, "nitro.pool.crop_fraction must be in (0, 1]")
        _check(self.reduce in ("mean", "sum"), "nitro.pool.reduce must be 'mean' or 'sum'")
        _check(self.head_norm in ("group", "none"), "nitro.pool.head_norm must be 'group' or 'none'")
        _check(self.head_kind in ("patch", "stats"), "nitro.pool.head_kind must be 'patch' or 'stats'")
        _check(self.replay >= 0, "nitro.pool.replay must be >= 0")
        _check(self.mismatch >= 0, "nitro.pool.mismatch must be >= 0")


@dataclass
class NitroConfig:
    """Stage 3: dynamic adversarial training, then bottom-up refinement for 2, 3, 4 steps."""

    pool: PoolConfig = field(default_factory=PoolConfig)
    loss: str = "softplus"  # or "hinge"
    shift: int = 250  # timestep shift S; saved as `shifted_timestep` in the student's scheduler config
    # Bottom-up: iterations spent with max steps 1, 2, 3, 4. In phase k each iteration draws its step count
    # uniformly from 1..k, runs the first steps without grad and trains the last (re-noised own output).
    phase_steps: tuple[int, ...] = (500, 150, 150, 150)
    # Which step counts a phase p >= 2 trains; the paper only says "one level at a time". "all": k ~ U{1..p} (the
    # 1-step map keeps a share of every phase). "multi": k ~ U{2..p}, so the 1-step map trains in phase 1 only and
    # moves afterwards only through the weights it shares. "newest": k = p, the new level alone. "half_one": k = 1
    # with probability 1/2, else k ~ U{2..p}. Made to test whether phases 2-4 are what cost the 1-step student its
    # FID (EVAL.md: 23.6 after phase 1, 26.2 after all). Measured (docs/training.md, round 25, paired against "all"
    # on 2,000 images): the step counts share weights, so without 1-step iterations the 1-step student forgets
    # ("multi" -11.2 points, "newest" -25.9); "half_one" trades -0.9 points for -3.5 shapes-FID. "all" stays.
    phase_draw: str = "all"
    lr_disc: float = 1e-3
    disc_steps: int = 1  # discriminator updates per generator update
    # What the heads call real. "teacher": the cached teacher samples (the paper: no real images). "data": the
    # teacher stage's pre-encoded dataset latents (teacher/latent_pool.pt), for when the data exists and the
    # teacher's samples cap quality.
    real: str = "teacher"
    # Generator loss = adv_weight * adversarial + reg_weight * L2, the L2 term pulling the student's output from a
    # cached teacher noise toward that noise's teacher sample (the init's own objective). The paper is adversarial
    # only (reg_weight 0). On the shapes recipe its discriminator pool stays near chance (loss_d ~ 2 ln 2) and the
    # student drifts away from the init (1-step FID 49.5 -> 104 after 500 iterations); with the L2 anchor and a
    # 2.5x learning rate it improves on the init (46.1 at 500). Measured on an H100: bench/nitro_sweep.py,
    # BENCHMARKS.md "Stage-3 sweep". adv_weight=0 is the control: the L2 term alone, no discriminator signal.
    adv_weight: float = 1.0
    reg_weight: float = 10.0
    # The adversarial term acts on iterations that generate with at least this many steps (1: all, the paper).
    # 2: 1-step iterations learn from the L2 term alone and the heads judge only k-step outputs, whose L2 target
    # is ill-posed (reg_multistep). Why: on shapes16 the heads sat at chance on 1-step fakes and their gradient
    # cost the 1-step student 42 points of alignment (control 73.0% -> 31.2%, 400 images), while on the
    # control's multi-step fakes they seemed to learn (accuracy 0.60-0.71, but judged after 3 updates on the same
    # batch; round 8: on fresh latents such heads sit near chance). Measured with 2 (docs/training.md, round 2):
    # the 1-step student still fell (the k-step iterations train the same weights), and one pool collapsed.
    adv_min_steps: int = 1
    # The L2 term on k-step iterations (k > 1). "off": none. "sample": against the cached teacher sample of the
    # starting noise; a k-step output depends on the fresh noise of each re-noising, so that sample is not its
    # target, and pulling it there cost the 1-step student 10 FID during phases 2-4 (46.2 -> 56.9, measured on
    # this CPU). "teacher": against the teacher's own DPM-Solver sample from the student's last-step input (a
    # well-posed target, +40% stage time): multi-step alignment rose (4 steps 53.4% -> 63.6%, FID 40.1 -> 41.7)
    # but the 1-step student fell to FID 50.1 from 38.4, behind its init (this CPU, 2,000 images, 2026-11-26).
    # The targets are at 1 step, so the default is off.
    reg_multistep: str = "off"
    # None: the L2 weight stays reg_weight. A number: it falls linearly from reg_weight at the first iteration to
    # this at the last (all phases), so the adversarial term gets the last word. Made to test round 7's reading
    # (heads on dataset reals pulling against an anchor on the teacher's samples). Measured (docs/training.md,
    # round 8): fading 10 -> 1 cost the 1-step student 22.6 points against its own fading control, 10 -> 0 cost
    # 33.3; the heads did not lead it toward the dataset. Kept for experiments; no recipe uses it.
    reg_weight_end: float | None = None
    # also save the student as unet_step<N>/ every N iterations (0: never); for sweeps: bench/pick_run.py scores a
    # snapshot folder. Round 29: 50 iterations apart the 1-step student moved up to 2.2 points and 6.7 shapes-FID,
    # and a snapshot picked on the validation prompts moved along the alignment/FID line, not off it.
    snapshot_every: int = 0
    # Student and (its gradient runs back through it) the frozen teacher encoder recompute activations in backward.
    gradient_checkpointing: bool = False
    # > 0: keep an exponential moving average of the student (torch AveragedModel, updated every optimizer step),
    # saved as nitro/unet (the trained weights as nitro/unet_raw). 0: off, the shapes recipe's choice: no gain without
    # the DMD term (round 3); beside it, 0.995 traded 2.4 points of 1-step alignment for 2.3 shapes-FID (round 21).
    ema_decay: float = 0.0
    # Stage 3's own seed (its batches, noise, head draws and pool init); None: run.seed. Stage 3 is where runs of
    # one recipe differ most (shapes16, three seeds from the same init: 1-step FID 40.7 to 49.8), so a recipe can
    # name the stage-3 run that made its model without reseeding the stages before it.
    seed: int | None = None
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=0, batch_size=16, lr=5e-5, warmup=0))
    # > 0: a distribution-matching term (trainer/dmd.py; DMD, whose DMD2 the paper starts from) added to the
    # generator loss at this weight: the guided teacher's and an online "fake score" UNet's x0 predictions from the
    # student's noised output. 0: off (every recipe; round 19 measured it, docs/training.md).
    dmd_weight: float = 0.0
    dmd_guidance: float = 0.0  # the teacher's classifier-free guidance in the DMD term; 0: teacher.guidance_scale
    dmd_lr: float = 1e-4  # the fake score's AdamW learning rate
    dmd_fake_steps: int = 1  # fake-score updates per iteration (DMD2: 5)
    # The noise levels the term and the fake score draw from (DMD2's). Round 21, one run each on 1,000 validation
    # prompts: [20, 600] kept the 1-step alignment (-0.9 [-2.1, +0.4]) with a shapes-FID 2.9 better; [200, 980] lost
    # 5.2 points. Round 22, over a second base, paired against the recipe's [20, 980]: [20, 600] alignment -0.5
    # [-1.8, +0.8], shapes-FID -2.00 [-3.88, -0.16]; [20, 800] changed nothing, [20, 400] lost 2.0 points. Round 23,
    # the whole recipe with [20, 600], on the eval set: 92.5% at 1 step (1.3 under the bundled model), shapes-FID
    # 25.32 (0.9 better), so the recipe keeps DMD2's. Round 24, paired against [20, 980] over the same stages on the
    # eval set: -0.7 [-1.5, +0.2] points, shapes-FID -3.05 [-4.26, -1.90] at 1 step (docs/training.md, rounds 22-24).
    dmd_t_range: tuple[int, int] = (20, 980)
    # Stage 3's own cache.small_patterned_weight (None: the cache's, which the init uses too). Made because round 27
    # read a gain in stage 3 and a 1.7-point cost in the init. Measured (docs/training.md, round 28, over one init):
    # at stage 3 seed 2, w = 2 costs 1.9 shapes-FID [+0.65, +3.17] for +0.1 points; at seed 1, w = 3 loses 2.7
    # points against w = 2. Kept for experiments; no recipe sets it.
    small_patterned_weight: float | None = None

    def __post_init__(self):
        self.phase_steps = tuple(self.phase_steps)
        _check(self.small_patterned_weight is None or self.small_patterned_weight > 0,
               "nitro.small_patterned_weight must be > 0 (or null: cache.small_patterned_weight)")
        _check(self.loss in ("softplus", "hinge"), "nitro.loss must be 'softplus' or 'hinge'")
        _check(0 < self.shift <= 1000, "nitro.shift must be in (0, 1000]")
        _check(self.real in ("teacher", "data"), "nitro.real must be 'teacher' or 'data'")
        _check(self.reg_weight >= 0 and self.adv_weight >= 0, "nitro.reg_weight and nitro.adv_weight must be >= 0")
        _check(self.dmd_weight >= 0, "nitro.dmd_weight must be >= 0")
        _check(self.reg_weight + self.adv_weight + self.dmd_weight > 0,
               "nitro: adv_weight, reg_weight and dmd_weight cannot all be 0")
        self.dmd_t_range = tuple(self.dmd_t_range)
        _check(len(self.dmd_t_range) == 2 and 0 <= self.dmd_t_range[0] <= self.dmd_t_range[1] <= 999,
               "nitro.dmd_t_range must be [low, high] with 0 <= low <= high <= 999")
        _check(self.dmd_fake_steps >= 1 and self.dmd_lr > 0, "nitro.dmd_fake_steps must be >= 1, nitro.dmd_lr > 0")
        _check(self.dmd_guidance >= 0, "nitro.dmd_guidance must be >= 0 (0: teacher.guidance_scale)")
        _check(1 <= self.adv_min_steps <= 4, "nitro.adv_min_steps must be in 1..4")
        _check(self.adv_min_steps == 1 or self.reg_weight > 0,
               "nitro.adv_min_steps > 1 needs nitro.reg_weight > 0 (1-step iterations would have no loss)")
        _check(self.snapshot_every >= 0, "nitro.snapshot_every must be >= 0")
        _check(0 <= self.ema_decay < 1, "nitro.ema_decay must be in [0, 1)")
        _check(self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
               "nitro.seed must be a non-negative integer or null (null: run.seed)")
        _check(self.reg_multistep in ("off", "sample", "teacher"), "nitro.reg_multistep: off, sample or teacher")
        _check(self.reg_weight_end is None or (self.reg_weight > 0 and 0 <= self.reg_weight_end),
               "nitro.reg_weight_end must be >= 0 (or null), and needs nitro.reg_weight > 0 to fade from")
        _check(1 <= len(self.phase_steps) <= 4, "nitro.phase_steps: 1 to 4 entries (max steps 1..4)")
        _check(self.phase_draw in ("all", "multi", "newest", "half_one"),
               "nitro.phase_draw: all, multi, newest or half_one")
        self.optim.steps = sum(self.phase_steps)  # total iterations; the phases decide the step count

    def reg_weight_at(self, iteration: int) -> float:
        """The L2 weight at an iteration: reg_weight, or (reg_weight_end set) linear from it to reg_weight_end."""
        if self.reg_weight_end is None:
            return self.reg_weight
        frac = min(iteration, self.optim.steps - 1) / max(1, self.optim.steps - 1)
        return self.reg_weight + (self.reg_weight_end - self.reg_weight) * frac

    def max_steps_at(self, iteration: int) -> int:
        """Which bottom-up phase (1-4) an iteration belongs to."""
        end = 0
        for k, n in enumerate(self.phase_steps, start=1):
            end += n
            if iteration < end:
                return k
        return len(self.phase_steps)


@dataclass
class PreviewConfig:
    """Stage 4 (trainer/preview_decoder.py): an AutoencoderTiny decoder distilled from the model's own VAE decoder
    into `<model>/vae_preview/`, for previews and `decoder: fast`. It reads UNet-space latents (what preview() gets)."""

    # Uniform width (DecoderTiny cannot change width between stages) and blocks per resolution, 8x8 -> 64x64: 0.4x
    # the full decoder's FLOPs (the full one is only 8 wide at 64x64 already). A block at 64x64 matters: without
    # one, the last two convs have no nonlinearity between them and edges blur. Measured on this CPU (2026-11-30,
    # 1800 steps; PSNR vs the full decoder on held-out / the student's 1-step latents; detector alignment of the
    # student's 128 eval images, full decoder 63.3%): 16 wide (2, 2, 1, 0), 51 MFLOP: 24.4 / 23.9 dB, 40.6%;
    # 12 wide (2, 2, 2, 1), 70 MFLOP: 24.3 / 24.0 dB, 48.4%; 16 wide (1, 1, 1, 1), 104 MFLOP: 25.0 / 24.3 dB, 46.9%.
    # lr 5e-3 beat 2e-3 (21.1 vs 20.3 dB at 150 steps); 600 steps instead of 1800 cost 1.9 dB.
    channels: int = 12
    blocks: tuple[int, ...] = (2, 2, 2, 1)
    pairs: int = 2048  # training latents from dataset images; half of them perturbed (below)
    # Perturbed half: + N(0, s^2), s ~ U(0, noise), in UNet space, with the full decoder's image of the perturbed
    # latent as target: previews decode predicted x0, which sits near but not on the encoder's latents.
    noise: float = 0.5
    eval_pairs: int = 256  # held-out-split latents for the recorded quality numbers
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=1800, batch_size=16, lr=5e-3, warmup=20,
                                                                   decay_steps=1800, log_every=300))

    def __post_init__(self):
        self.blocks = tuple(self.blocks)
        _check(self.channels >= 1 and all(b >= 0 for b in self.blocks), "preview.channels >= 1, blocks >= 0")
        _check(self.pairs >= 2 and self.eval_pairs >= 1 and self.noise >= 0, "preview: pairs >= 2, eval_pairs >= 1")
