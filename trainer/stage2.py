"""Stage 2: teacher pairs (cached once) and the one-step initialisation.

The paper starts NitroFusion from an already-distilled one-step model (DMD2 / Hyper-SD). We have none, so the
init is the simplest distillation that gives one: regression of the student's one-step prediction on the
teacher's 25-step sample from the *same* noise (as in Progressive/"knowledge" distillation, Luhman & Luhman
2021). The student starts from the teacher's weights and is called exactly as at inference: noise at level 999,
UNet at the shifted timestep floor(999 * S / 1000), x0 through `LCMSampler.denoise`. The cached teacher samples
double as the "real" samples of stage 3 (the paper's reals are teacher outputs too).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from nitrofusion.sampler import LCMSampler

from .conditioning import Conditioning, unet_kwargs
from .config import TrainConfig
from .loop import Stage, autocast, set_lr, step_generator
from .models import alphas_cumprod
from .shapes import ShapesDataset
from .skeleton import StageJob, accumulate, make_optimizer, run_stage, step_optimizer
from .stage1 import load_frozen, sample_teacher

CACHE_PROMPT_OFFSET = 10**8  # dataset indices for cache prompts: far from the teacher's training stream


def build_cache(cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], teacher_dir: Path, accelerator) -> Path:
    """Chunks of (noise, x0, prompts) under folder/; an existing chunk is never regenerated (resume)."""
    from diffusers import UNet2DConditionModel

    c = cfg.cache
    stage = Stage("cache", folder, cfg, accelerator, -(-c.num_pairs // c.batch_size))
    if stage.done:
        return folder
    frozen = load_frozen(frozen_dirs, accelerator.device)
    unet = UNet2DConditionModel.from_pretrained(teacher_dir).to(accelerator.device).eval().requires_grad_(False)
    data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
    latent = cfg.data.image_size // 8
    for i in range(stage.total):
        stage.step = i + 1
        path = folder / f"chunk_{i:05d}.pt"
        if i % accelerator.num_processes != accelerator.process_index or path.exists():
            continue
        n = min(c.batch_size, c.num_pairs - i * c.batch_size)
        idx = range(CACHE_PROMPT_OFFSET + i * c.batch_size, CACHE_PROMPT_OFFSET + i * c.batch_size + n)
        prompts = data.prompts(idx)
        noise = torch.randn((n, cfg.autoencoder.latent_channels, latent, latent),
                            generator=step_generator(cfg.run.seed, "cache", i))
        with autocast(accelerator):
            x0 = sample_teacher(unet, frozen["text"], prompts, noise.to(accelerator.device),
                                cfg.teacher.sample_steps, cfg.teacher.guidance_scale)
        tmp = path.with_suffix(".tmp")
        torch.save({"noise": noise, "x0": x0.float().cpu(), "prompts": prompts}, tmp)
        tmp.rename(path)
        stage.log({"pairs": min((i + 1) * c.batch_size, c.num_pairs)})
    stage.close()
    accelerator.wait_for_everyone()
    stage.mark_done()
    return folder


def load_cache(folder: Path) -> dict:
    chunks = [torch.load(p, weights_only=False) for p in sorted(Path(folder).glob("chunk_*.pt"))]
    if not chunks:
        raise FileNotFoundError(f"no teacher pairs in {folder}: run the cache stage first")
    return {"noise": torch.cat([ch["noise"] for ch in chunks]), "x0": torch.cat([ch["x0"] for ch in chunks]),
            "prompts": [p for ch in chunks for p in ch["prompts"]]}


def cache_batch(cache: dict, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    idx = torch.randint(0, len(cache["prompts"]), (n,), generator=gen)
    return cache["noise"][idx], cache["x0"][idx], [cache["prompts"][i] for i in idx.tolist()]


def one_step_x0(unet, sampler: LCMSampler, noise: torch.Tensor, cond: Conditioning, shift: int) -> torch.Tensor:
    """The student's one-step output exactly as inference computes it (shifted timestep, LCM boundary)."""
    t = sampler.schedule(1, shift).model_timesteps[0]
    ts = torch.full((noise.shape[0],), t, dtype=torch.long, device=noise.device)
    eps = unet(noise, ts, **unet_kwargs(cond)).sample.float()
    return sampler.denoise(noise, eps, [t] * noise.shape[0])


class InitJob(StageJob):
    """Output: folder/unet, the one-step student the adversarial stage starts from."""

    name = "init"

    def __init__(self, cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], teacher_dir: Path,
                 cache_dir: Path, accelerator):
        super().__init__(cfg, folder, accelerator)
        self.frozen_dirs, self.teacher_dir, self.cache_dir = frozen_dirs, teacher_dir, cache_dir

    @property
    def optim(self):
        return self.cfg.init.optim

    def outputs(self) -> Path:
        return self.folder / "unet"

    def build(self, stage: Stage) -> None:
        from diffusers import UNet2DConditionModel

        self.frozen = load_frozen(self.frozen_dirs, self.acc.device)
        self.unet = UNet2DConditionModel.from_pretrained(self.teacher_dir)
        if self.cfg.init.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.opt = make_optimizer(self.unet.parameters(), self.optim)
        stage.register("unet", self.unet, self.opt)

    def start(self, stage: Stage) -> None:
        self.unet, self.opt = self.acc.prepare(self.unet, self.opt)
        self.unet.train()
        self.cache = load_cache(self.cache_dir)
        self.sampler = LCMSampler(alphas_cumprod())

    def iteration(self, stage: Stage) -> dict[str, float]:
        c, acc = self.cfg.init, self.acc
        set_lr(self.opt, c.optim, stage.step)
        gen = stage.gen()

        def micro(i: int):
            noise, x0, prompts = cache_batch(self.cache, gen, c.optim.batch_size)
            noise, x0 = noise.to(acc.device), x0.to(acc.device)
            emb = self.frozen["text"](prompts)
            with autocast(acc):
                pred = one_step_x0(self.unet, self.sampler, noise, emb, self.cfg.nitro.shift)
                loss = F.mse_loss(pred.float(), x0)
            return loss, {"loss": loss}

        logs = accumulate(acc, self.unet, c.optim.grad_accum, micro)
        step_optimizer(acc, self.opt, self.unet.parameters(), c.optim)
        return logs

    def save(self) -> None:
        self.acc.unwrap_model(self.unet).save_pretrained(self.folder / "unet")


def train_init(cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], teacher_dir: Path, cache_dir: Path,
               accelerator) -> Path:
    return run_stage(InitJob(cfg, folder, frozen_dirs, teacher_dir, cache_dir, accelerator))
