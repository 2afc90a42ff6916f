"""Stage 3: NitroFusion dynamic adversarial training, then bottom-up refinement for 2, 3 and 4 steps.

One iteration (paper Sec. 3.2-3.3):
  1. draw t* and sample one head per (level, task) for it; re-initialise ~1% of the whole pool (refresh);
  2. the student generates: k ~ U{1..phase} steps of the shifted LCM schedule (nitrofusion.sampler, so training
     and inference agree); the first k-1 without gradients (re-noising its own output), the last with them;
  3. generator update: adversarial loss of the sampled heads on the fake x0, plus (`nitro.reg_weight` > 0, the
     shapes default; the paper has none) an L2 term: the fakes start from cached teacher noises and each
     one-step output is pulled toward its teacher sample;
  4. discriminator update: the sampled heads on real x0 (teacher samples, or dataset latents with
     `nitro.real=data`) vs the detached fake x0.
Each iteration is one optimizer step over nitro.optim.grad_accum micro-batches of nitro.optim.batch_size rows
(the paper: 5 x 20); the steps themselves live in nitro_step.py, and take SD1.x or SDXL conditioning.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nitrofusion.sampler import LCMSampler

from .conditioning import expand
from .config import TrainConfig
from .discriminator import FrozenEncoder, HeadPool
from .loop import Stage, frozen_dtype, set_lr
from .models import alphas_cumprod, count_params
from .nitro_step import Batch, NitroNets, Plan, discriminator_step, draw_noises, generator_step, student_x0
from .skeleton import StageJob, make_optimizer, run_stage
from .stage1 import latent_pool, load_frozen
from .stage2 import cache_batch, load_cache

PHASE1_DIR = "unet_phase1"  # snapshot of the student when phase 1 (one-step training) ends
__all__ = ["PHASE1_DIR", "NitroJob", "student_x0", "train_nitro"]


class NitroJob(StageJob):
    """Output: folder/unet, the 1-4 step student."""

    name = "nitro"

    def __init__(self, cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], teacher_dir: Path,
                 init_dir: Path, cache_dir: Path, accelerator):
        super().__init__(cfg, folder, accelerator)
        self.frozen_dirs, self.teacher_dir, self.init_dir, self.cache_dir = frozen_dirs, teacher_dir, init_dir, cache_dir

    @property
    def optim(self):
        return self.cfg.nitro.optim

    def outputs(self) -> Path:
        return self.folder / "unet"

    # -- setup --------------------------------------------------------------------------------------
    def build(self, stage: Stage) -> None:
        from diffusers import UNet2DConditionModel

        cfg, c, dev = self.cfg, self.cfg.nitro, self.acc.device
        self.frozen = load_frozen(self.frozen_dirs, dev)
        dtype = frozen_dtype(cfg.run, self.acc)
        self.teacher = UNet2DConditionModel.from_pretrained(
            self.teacher_dir, **({} if dtype == torch.float32 else {"torch_dtype": dtype}))
        if c.gradient_checkpointing:  # the generator's gradient runs back through the encoder too
            self.teacher.enable_gradient_checkpointing()
        self.encoder = FrozenEncoder(self.teacher).to(dev)
        if c.reg_multistep == "teacher":  # the whole teacher (its decoder too) only where it makes k-step targets
            self.teacher.to(dev).eval().requires_grad_(False)
        torch.manual_seed(cfg.run.seed)
        self.pool = HeadPool(c.pool, self.encoder.shapes(cfg.data.image_size // 8))
        self.student = UNet2DConditionModel.from_pretrained(self.init_dir)
        if c.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.ema = None
        if c.ema_decay:  # registered before the checkpoint loads, so a resumed run keeps its average
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay))
            stage.register("student_ema", self.ema)
        self.opt_g = make_optimizer(self.student.parameters(), c.optim)
        # The heads' optimizer is always plain AdamW: small, and refresh drops its per-head state.
        self.opt_d = torch.optim.AdamW(self.pool.parameters(), lr=c.lr_disc, betas=(0.0, 0.99))
        stage.register("student", self.student, self.opt_g)
        stage.register("pool", self.pool, self.opt_d)

    def describe(self) -> str:
        return (f"student {count_params(self.student) / 1e6:.2f}M, pool {len(self.pool)} heads "
                f"({count_params(self.pool) / 1e6:.2f}M), {len(self.pool.level_shapes)} feature levels")

    def start(self, stage: Stage) -> None:
        cfg, c, acc = self.cfg, self.cfg.nitro, self.acc
        student, opt_g, pool, opt_d = acc.prepare(self.student, self.opt_g, self.pool, self.opt_d)
        if self.ema is not None:
            self.ema.to(acc.device)
        self.nets = NitroNets(acc, student, acc.unwrap_model(student), self.encoder, pool, acc.unwrap_model(pool),
                              opt_g, opt_d, LCMSampler(alphas_cumprod()), self.ema, self.teacher, self.frozen["text"],
                              cfg.teacher.sample_steps, cfg.teacher.guidance_scale)
        student.train()
        pool.train()
        self.cache = load_cache(self.cache_dir)
        self.reals = self.cache
        if c.real == "data":  # the teacher stage's encoded dataset images (encoded now if that stage kept none)
            if not cfg.teacher.latent_pool:
                raise ValueError("nitro.real=data reads the teacher's latent pool: set teacher.latent_pool > 0")
            from .shapes import ShapesDataset

            data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
            pool_lat = latent_pool(cfg, Path(self.teacher_dir).parent, self.frozen["vae"], data, acc)
            self.reals = {"x0": pool_lat["latents"], "prompts": pool_lat["prompts"]}
        self.uncond_1 = self.frozen["text"]([""])

    # -- one iteration --------------------------------------------------------------------------------
    def draw(self, stage: Stage, gen: torch.Generator) -> tuple[Plan, Batch]:
        """1. This iteration's t*, head subset and refresh: drawn from a rank-free generator so all ranks agree;
        then its batch (grad_accum x batch_size rows) and all of its noise from this rank's generator."""
        c, nets, dev = self.cfg.nitro, self.nets, self.acc.device
        shared = stage.shared_gen()
        t_star = c.pool.timesteps[int(torch.randint(len(c.pool.timesteps), (1,), generator=shared))]
        heads = nets.raw_pool.sample(t_star, shared)
        opt_d = nets.opt_d
        self.refreshed = nets.raw_pool.refresh(shared, opt_d.optimizer if hasattr(opt_d, "optimizer") else opt_d)
        steps = 1 + int(torch.randint(c.max_steps_at(stage.step), (1,), generator=shared))
        reg = c.reg_weight if steps == 1 or c.reg_multistep != "off" else 0.0
        plan = Plan(t_star, heads, steps, reg, nets.raw_pool.tasks_of(heads))
        # Fakes start from fresh noise, or (reg_weight > 0) from cached teacher noises, whose samples are targets.
        b = c.optim.batch_size * c.optim.grad_accum
        pair_noise, target, prompts = cache_batch(self.cache, gen, b)
        noise = pair_noise.to(dev) if c.reg_weight else torch.randn(target.shape, generator=gen).to(dev)
        if c.real == "data":
            pick = torch.randint(len(self.reals["prompts"]), (b,), generator=gen)
            real, real_prompts = self.reals["x0"][pick], [self.reals["prompts"][i] for i in pick.tolist()]
        else:
            real, real_prompts = target, prompts
        text = self.frozen["text"]
        cond = text(prompts)
        batch = Batch(noise, target.to(dev), prompts, cond, real.to(dev),
                      cond if real_prompts is prompts else text(real_prompts), expand(self.uncond_1, b),
                      *draw_noises(gen, tuple(noise.shape), plan, c))
        return plan, batch

    def iteration(self, stage: Stage) -> dict[str, float]:
        c = self.cfg.nitro
        gen = stage.gen()
        set_lr(self.nets.opt_g, c.optim, stage.step)
        plan, batch = self.draw(stage, gen)
        # 2-3. Generator step, then 4. discriminator step(s) on its detached fakes.
        fake, g_logs = generator_step(self.nets, plan, batch, c, c.optim.batch_size)
        d_logs = discriminator_step(self.nets, plan, batch, fake, c, c.optim.batch_size)
        stage.extra_state["last_refreshed"] = self.refreshed
        logs = {"loss_g": g_logs["loss_g"], "loss_d": d_logs["loss_d"], "t_star": plan.t_star, "steps": plan.steps,
                "heads": len(plan.heads), "refreshed": len(self.refreshed)}
        if "loss_reg" in g_logs:
            logs["loss_reg"] = g_logs["loss_reg"]
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


def train_nitro(cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], teacher_dir: Path, init_dir: Path,
                cache_dir: Path, accelerator) -> Path:
    """Output: folder/unet, the 1-4 step student."""
    return run_stage(NitroJob(cfg, folder, frozen_dirs, teacher_dir, init_dir, cache_dir, accelerator))
