"""Stage 3: NitroFusion dynamic adversarial training, then bottom-up refinement for 2, 3 and 4 steps.

One iteration (paper Sec. 3.2-3.3):
  1. draw t* and sample one head per (level, task) for it; re-initialise ~1% of the whole pool (refresh);
  2. the student generates: k ~ U{1..phase} steps (`nitro.phase_draw`) of the shifted LCM schedule
     (nitrofusion.sampler, so training and inference agree); the first k-1 without gradients (re-noising its own
     output), the last with them;
  3. generator update: adversarial loss of the sampled heads on the fake x0, plus (`nitro.reg_weight` > 0, the
     shapes default; the paper has none) an L2 term: the fakes start from cached teacher noises and each
     one-step output is pulled toward its teacher sample;
  4. discriminator update: the sampled heads on real x0 (teacher samples, or dataset latents with
     `nitro.real=data`) vs the detached fake x0.
Each iteration is one optimizer step over nitro.optim.grad_accum micro-batches of nitro.optim.batch_size rows
(the paper: 5 x 20); the steps themselves live in nitro_step.py, and take SD1.x or SDXL conditioning.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import replace
from pathlib import Path

import torch

from nitrofusion.sampler import LCMSampler

from .cache import PairCache, cache_batch, conditioning_of
from .conditioning import expand, to
from .config import NitroConfig, TrainConfig
from .discriminator import FrozenEncoder, HeadPool
from .dmd import DMDDraws
from .loop import Stage, frozen_dtype, set_lr
from .models import alphas_cumprod, count_params
from .nitro_step import (
    Batch,
    NitroNets,
    Plan,
    discriminator_step,
    draw_noises,
    fake_score_step,
    generator_step,
    student_x0,
)
from .skeleton import StageJob, adamw, make_optimizer, moving_average, run_stage
from .stage1 import TeacherSampler

PHASE1_DIR = "unet_phase1"  # snapshot of the student when phase 1 (one-step training) ends
__all__ = ["PHASE1_DIR", "NitroJob", "draw_steps", "student_x0", "train_nitro"]


def draw_steps(c: NitroConfig, iteration: int, gen: torch.Generator) -> int:
    """An iteration's step count k, by nitro.phase_draw; "all" draws exactly what it drew before the option. Where k
    is fixed ("newest"; "multi" in phase 2) nothing is drawn, as in round 25's runs, which stay reproducible."""
    p = c.max_steps_at(iteration)
    if c.phase_draw == "newest" or (c.phase_draw == "multi" and p == 2):
        return p
    if c.phase_draw == "multi" and p > 2:
        return 2 + int(torch.randint(p - 1, (1,), generator=gen))
    if c.phase_draw == "half_one" and p > 1:  # k = 1 with probability 1/2, else k ~ U{2..p}
        r = int(torch.randint(2 * (p - 1), (1,), generator=gen))
        return 1 if r < p - 1 else 2 + r - (p - 1)
    return 1 + int(torch.randint(p, (1,), generator=gen))


class NitroJob(StageJob):
    """Output: folder/unet, the 1-4 step student."""

    name = "nitro"

    def __init__(self, cfg: TrainConfig, folder: Path, source, init_dir: Path, cache_dir: Path, accelerator):
        super().__init__(cfg, folder, accelerator)
        self.source, self.init_dir, self.cache_dir = source, init_dir, cache_dir

    @property
    def optim(self):
        return self.cfg.nitro.optim

    def outputs(self) -> Path:
        return self.folder / "unet"

    # -- setup --------------------------------------------------------------------------------------
    def build(self, stage: Stage) -> None:
        from diffusers import UNet2DConditionModel

        from .source import student_from_file

        cfg, c, dev = self.cfg, self.cfg.nitro, self.acc.device
        dtype = frozen_dtype(cfg.run, self.acc)
        self.frozen = self.source.frozen(dev, dtype, text_dtype=dtype)
        self.teacher = self.frozen.teacher
        if c.gradient_checkpointing:  # the generator's gradient runs back through the encoder too
            self.teacher.enable_gradient_checkpointing()
        self.encoder = FrozenEncoder(self.teacher).to(dev)
        if c.reg_multistep == "teacher" or c.dmd_weight:  # the whole teacher (its decoder too) only where it
            # makes k-step targets or is the DMD term's real score
            self.teacher.to(dev).eval().requires_grad_(False)
        torch.manual_seed(cfg.run.seed)
        self.pool = HeadPool(c.pool, self.encoder.shapes(self.source.latent_size))
        if cfg.source.init_unet:  # the paper's start: an already-distilled few-step UNet (DMD2, NitroSD, ...)
            self.student = student_from_file(self.teacher, cfg.source.init_unet)
        else:
            self.student = UNet2DConditionModel.from_pretrained(self.init_dir)
        if c.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.ema = moving_average(stage, self.student, c.ema_decay, "student_ema")
        self.opt_g = make_optimizer(self.student.parameters(), c.optim)
        # The heads' optimizer is never the 8-bit one: small, and refresh drops its per-head state.
        self.opt_d = adamw(self.pool.parameters(), fused=c.optim.fused, lr=c.lr_disc, betas=(0.0, 0.99))
        stage.register("student", self.student, self.opt_g)
        stage.register("pool", self.pool, self.opt_d)
        self.fake_score = self.opt_fake = None
        if c.dmd_weight:  # the DMD term's fake score starts as the teacher, in fp32, and trains
            self.fake_score = copy.deepcopy(self.teacher).float().to(dev).requires_grad_(True)
            self.opt_fake = adamw(self.fake_score.parameters(), fused=c.optim.fused, lr=c.dmd_lr)
            stage.register("fake_score", self.fake_score, self.opt_fake)

    def describe(self) -> str:
        return (f"student {count_params(self.student) / 1e6:.2f}M, pool {len(self.pool)} heads "
                f"({count_params(self.pool) / 1e6:.2f}M), {len(self.pool.level_shapes)} feature levels")

    def start(self, stage: Stage) -> None:
        cfg, c, acc = self.cfg, self.cfg.nitro, self.acc
        student, opt_g, pool, opt_d = acc.prepare(self.student, self.opt_g, self.pool, self.opt_d)
        if self.ema is not None:
            self.ema.to(acc.device)
        schedule = self.source.noise_schedule
        fake_score, opt_fake = self.fake_score, self.opt_fake
        if fake_score is not None:
            fake_score, opt_fake = acc.prepare(fake_score, opt_fake)
            fake_score.train()
        self.nets = NitroNets(acc, student, acc.unwrap_model(student), self.encoder, pool, acc.unwrap_model(pool),
                              opt_g, opt_d, LCMSampler(alphas_cumprod(schedule)), self.ema, self.teacher,
                              TeacherSampler.from_config(cfg.teacher, schedule), fake_score,
                              None if fake_score is None else acc.unwrap_model(fake_score), opt_fake)
        student.train()
        pool.train()
        self.cache = PairCache(self.cache_dir, small_patterned_weight=self.cfg.cache_draw_weight("nitro"))
        self.reals = None
        if c.real == "data":  # dataset latents (shapes: the teacher stage's pool; --from: the --prompts images)
            self.reals = self.source.real_pool(self.frozen, acc, self.cache_dir)
        text = self.frozen.text
        self.uncond_1 = to(self.cache.uncond, acc.device) if self.cache.uncond is not None else text([""])
        self.past = deque(maxlen=c.pool.replay)  # (detached fakes, their conditioning) of recent iterations

    # -- one iteration --------------------------------------------------------------------------------
    def draw(self, stage: Stage, gen: torch.Generator) -> tuple[Plan, Batch]:
        """1. This iteration's t*, head subset and refresh: drawn from a rank-free generator so all ranks agree;
        then its batch (grad_accum x batch_size rows) and all of its noise from this rank's generator."""
        c, nets, dev = self.cfg.nitro, self.nets, self.acc.device
        shared = stage.shared_gen()
        t_star = c.pool.timesteps[int(torch.randint(len(c.pool.timesteps), (1,), generator=shared))]
        # The step count before the pool's draws, so that pool settings (replicas, refresh) do not change it.
        steps = draw_steps(c, stage.step, shared)
        heads = nets.raw_pool.sample(t_star, shared)
        opt_d = nets.opt_d
        self.refreshed = nets.raw_pool.refresh(shared, opt_d.optimizer if hasattr(opt_d, "optimizer") else opt_d)
        reg = c.reg_weight_at(stage.step) if steps == 1 or c.reg_multistep != "off" else 0.0
        adv = c.adv_weight if steps >= c.adv_min_steps else 0.0
        plan = Plan(t_star, heads, steps, reg, nets.raw_pool.tasks_of(heads), adv)
        # Fakes start from fresh noise, or (reg_weight > 0) from cached teacher noises, whose samples are targets.
        b = c.optim.batch_size * c.optim.grad_accum
        pairs = cache_batch(self.cache, gen, b)
        target, prompts = pairs.x0, pairs.prompts
        noise = pairs.noise.to(dev) if c.reg_weight else torch.randn(target.shape, generator=gen).to(dev)
        if self.reals is not None:
            real, real_prompts = self.dataset_rows(gen, b)
        else:
            real, real_prompts = target, prompts
        text = self.frozen.text
        cond = conditioning_of(pairs, text, dev)
        noises = draw_noises(gen, tuple(noise.shape), plan, c)
        # drawn after all the rest, so that runs without the DMD term draw exactly what they drew before it
        dmd = DMDDraws.draw(gen, tuple(noise.shape), c.dmd_t_range, c.dmd_fake_steps) if c.dmd_weight else None
        batch = Batch(noise, target.to(dev), prompts, cond, real.to(dev),
                      cond if real_prompts is prompts else text(real_prompts), expand(self.uncond_1, b),
                      *noises, dmd)
        return plan, batch

    def dataset_rows(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
        """n dataset latents and their prompts (nitro.real=data), drawn with replacement."""
        pick = torch.randint(len(self.reals["prompts"]), (n,), generator=gen)
        return self.reals["x0"][pick], [self.reals["prompts"][i] for i in pick.tolist()]

    def more_reals(self, gen: torch.Generator, n: int):
        """n more of what the heads call real, with their conditioning (nitro.pool.replay's extra rows)."""
        if self.reals is not None:
            x0, prompts = self.dataset_rows(gen, n)
            return x0, self.frozen.text(prompts)
        pairs = cache_batch(self.cache, gen, n)
        return pairs.x0, conditioning_of(pairs, self.frozen.text, self.acc.device)

    def iteration(self, stage: Stage) -> dict[str, float]:
        c = self.cfg.nitro
        gen = stage.gen()
        set_lr(self.nets.opt_g, c.optim, stage.step)
        plan, batch = self.draw(stage, gen)
        # 2-3. Generator step, then 4. discriminator step(s) on its detached fakes.
        fake, g_logs = generator_step(self.nets, plan, batch, c, c.optim.batch_size)
        d_batch, d_fake = batch, fake
        if c.pool.replay:
            if self.past:  # drawn after all of the iteration's own randomness: replay 0 leaves runs unchanged
                real, real_cond = self.more_reals(gen, sum(len(f) for f, _ in self.past))
                d_batch, d_fake = batch.disc().with_past(fake, list(self.past), real, real_cond, gen, plan.tasks,
                                                         c.pool.crop_fraction)
            self.past.append((fake, batch.cond))
        d_logs = discriminator_step(self.nets, plan, d_batch, d_fake, c, c.optim.batch_size)
        f_logs = fake_score_step(self.nets, batch, fake, c, c.optim.batch_size) if c.dmd_weight else {}
        stage.extra_state["last_refreshed"] = self.refreshed
        logs = {"loss_g": g_logs["loss_g"], "loss_d": d_logs["loss_d"], "t_star": plan.t_star, "steps": plan.steps,
                "heads": len(plan.heads), "refreshed": len(self.refreshed)}
        if "loss_reg" in g_logs:
            logs["loss_reg"] = g_logs["loss_reg"]
        # Appended after the existing columns, so scripts that read metrics.csv by position keep working.
        logs["acc_real"], logs["acc_fake"] = d_logs["acc_real"], d_logs["acc_fake"]
        if "acc_mismatch" in d_logs:  # nitro.pool.mismatch: the conditional heads on reals with a wrong prompt
            logs["acc_mismatch"] = d_logs["acc_mismatch"]
        if c.dmd_weight:  # the DMD term (trainer/dmd.py) and its fake score's denoising loss
            logs["loss_dmd"], logs["loss_fake"] = g_logs["loss_dmd"], f_logs["loss_fake"]
        return logs

    @property
    def exported(self) -> torch.nn.Module:
        """The student as saved: its EMA when nitro.ema_decay > 0, else the trained weights."""
        return self.ema.module if self.ema is not None else self.nets.raw_student

    def after_iteration(self, stage: Stage) -> None:
        c, raw = self.cfg.nitro, self.exported
        if stage.step == c.phase_steps[0] and len(c.phase_steps) > 1 and self.acc.is_main_process:
            # The one-step student before bottom-up refinement: what the 1-step ablations compare against.
            raw.save_pretrained(self.folder / PHASE1_DIR)
        if c.snapshot_every and stage.step % c.snapshot_every == 0 and self.acc.is_main_process:
            raw.save_pretrained(self.folder / f"unet_step{stage.step}")

    def save(self) -> None:
        self.exported.save_pretrained(self.folder / "unet")
        if self.ema is not None:
            self.nets.raw_student.save_pretrained(self.folder / "unet_raw")


def stage3_seed(cfg: TrainConfig) -> int:
    return cfg.run.seed if cfg.nitro.seed is None else cfg.nitro.seed


def train_nitro(cfg: TrainConfig, folder: Path, source, init_dir: Path, cache_dir: Path, accelerator) -> Path:
    """Output: folder/unet, the 1-4 step student (from init_dir/, or cfg.source.init_unet when set)."""
    # everything seeded in this stage follows nitro.seed, as it would run.seed
    cfg = replace(cfg, run=replace(cfg.run, seed=stage3_seed(cfg)))
    return run_stage(NitroJob(cfg, folder, source, init_dir, cache_dir, accelerator))
