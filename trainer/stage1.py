"""Stage 1: the teacher, an epsilon-prediction UNet2DConditionModel on VAE latents (SDXL's noise schedule).

Sampled with DPM-Solver++ (2nd order multistep, ~25 steps) and classifier-free guidance; the prompt is dropped
to "" `cond_dropout` of the time in training so the unconditional branch exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditioning import Conditioning, unet_kwargs
from .config import TeacherConfig, TrainConfig
from .loop import Stage, autocast, set_lr
from .models import NOISE_SCHEDULE, TextEncoderWrapper, add_noise, alphas_cumprod, build_unet, count_params
from .shapes import ShapesDataset
from .skeleton import StageJob, accumulate, make_optimizer, moving_average, run_stage, step_optimizer
from .stage0 import batch_indices


def load_frozen(folders: dict[str, Path], device) -> dict:
    """VAE, tokenizer and text encoder from stage 0, frozen on `device`."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(folders["vae"]).to(device).eval().requires_grad_(False)
    tok = CLIPTokenizer.from_pretrained(folders["tokenizer"])
    enc = CLIPTextModel.from_pretrained(folders["text_encoder"]).to(device).eval().requires_grad_(False)
    return {"vae": vae, "tokenizer": tok, "text_encoder": enc, "text": TextEncoderWrapper(tok, enc, device)}


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> UNet-space latents: posterior means x scaling_factor, (B, C, H/f, W/f)."""
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """What TorchBackend.decode computes before the uint8 postprocess, clamped to the range it keeps."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


def guided_eps(unet, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning, guidance: float) -> torch.Tensor:
    """The UNet's classifier-free guided epsilon, e_u + guidance (e_c - e_u), both halves in one call; guidance 1:
    one conditional call. `t`: one timestep for all rows, or (B,) per row."""
    if guidance == 1.0:
        return unet(x, t, **unet_kwargs(cond)).sample
    both_t = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim else t
    e_u, e_c = unet(torch.cat([x, x]), both_t, **unet_kwargs(Conditioning.cat([uncond, cond]))).sample.chunk(2)
    return e_u + guidance * (e_c - e_u)


@dataclass
class TeacherSampler:
    """How the teacher draws x0 (the cache's reals, stage 3's k-step targets): `solver` with classifier-free
    guidance (guidance 1: one conditional call a step, as a distilled teacher is run), `steps` trailing-spaced
    timesteps or a distilled teacher's own `timesteps`, on the model's noise `schedule`."""

    steps: int
    guidance: float
    solver: str = "dpmsolver++"
    timesteps: tuple[int, ...] = ()
    schedule: dict = field(default_factory=lambda: dict(NOISE_SCHEDULE))

    @classmethod
    def from_config(cls, c: TeacherConfig, schedule: dict | None = None) -> TeacherSampler:
        return cls(c.sample_steps, c.guidance_scale, c.solver, tuple(c.timesteps), dict(schedule or NOISE_SCHEDULE))

    def scheduler(self):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler

        common = {**self.schedule, "prediction_type": "epsilon", "timestep_spacing": "trailing"}
        if self.solver == "dpmsolver++":
            return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
        if self.solver == "euler":
            return EulerDiscreteScheduler(**common)
        if self.solver == "ddim":
            return DDIMScheduler(**common, clip_sample=False)  # latents are not in [-1, 1]
        return LCMScheduler(**common)

    @torch.no_grad()
    def __call__(self, unet, cond: Conditioning, uncond: Conditioning, noise: torch.Tensor, start: int | None = None,
                 steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """noise (B, C, h, w) N(0, I) -> x0 latents. `start`: begin from a partly noised x_start at that timestep
        instead (`noise` is then x_start): `steps` evenly spaced timesteps from it down to 0, or the distilled
        schedule's timesteps at or below it. `generator`: the LCM solver's re-noising."""
        steps = steps or self.steps
        sched = self.scheduler()
        if self.timesteps:
            ts = [t for t in self.timesteps if start is None or t <= start] or [start]
            sched.set_timesteps(timesteps=ts, device=noise.device)
        elif start is None:
            sched.set_timesteps(steps, device=noise.device)
        else:
            if self.solver == "ddim":
                raise ValueError("teacher.solver=ddim cannot start part-way (nitro.reg_multistep=teacher)")
            sched.set_timesteps(timesteps=[round(start - i * (start + 1) / steps) for i in range(steps)],
                                device=noise.device)
        if start is not None and self.solver == "euler":  # Euler runs on x / sqrt(abar): scale x_start to it
            x = noise * (sched.sigmas[0] ** 2 + 1) ** 0.5
        else:
            x = noise * sched.init_noise_sigma
        step_kwargs = {"generator": generator} if self.solver == "lcm" else {}
        for t in sched.timesteps:
            eps = guided_eps(unet, sched.scale_model_input(x, t), t, cond, uncond, self.guidance)
            x = sched.step(eps, t, x, **step_kwargs).prev_sample
        return x


def sample_teacher(unet, text: TextEncoderWrapper, prompts: list[str], noise: torch.Tensor, steps: int,
                   guidance: float, start: int | None = None) -> torch.Tensor:
    """DPM-Solver++ with classifier-free guidance from prompts (`TeacherSampler` takes conditioning)."""
    cond = text(prompts)
    return TeacherSampler(steps, guidance)(unet, cond, text([""] * len(prompts)), noise, start=start)


POOL_OFFSET = 2 * 10**8  # dataset indices of the latent pool


def latent_pool(cfg: TrainConfig, folder: Path, vae, data: ShapesDataset, accelerator, chunk: int = 256) -> dict:
    """`teacher.latent_pool` training images encoded once (each rank encodes all of it: it is the same data).
    Saved as folder/latent_pool.pt, so a resumed run does not re-encode."""
    path = folder / "latent_pool.pt"
    n = cfg.teacher.latent_pool
    if path.is_file():
        pool = torch.load(path, weights_only=False)
        if len(pool["prompts"]) == n:
            return pool
    from tqdm.auto import tqdm

    latents, prompts = [], []
    for start in tqdm(range(0, n, chunk), desc="latent pool", disable=not accelerator.is_main_process):
        images, p = data.batch(range(POOL_OFFSET + start, POOL_OFFSET + min(n, start + chunk)))
        latents.append(encode_images(vae, torch.from_numpy(images).to(accelerator.device)).float().cpu())
        prompts += p
    pool = {"latents": torch.cat(latents), "prompts": prompts}  # (n, 4, h, w)
    if accelerator.is_main_process:
        torch.save(pool, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
    return pool


def small_patterned(data: ShapesDataset, n: int) -> torch.Tensor:
    """(n,) bool: whether pool image i (dataset index POOL_OFFSET + i) is a small striped or checkered object."""
    return torch.tensor([data.attributes(POOL_OFFSET + i)[0].small_patterned for i in range(n)])


def pool_draw_weights(data: ShapesDataset, n: int, weight: float) -> torch.Tensor | None:
    """Per-image draw weights for the teacher's latent pool; None when uniform (weight 1), so the recipe's draws
    stay `torch.randint`'s, bit for bit."""
    return None if weight == 1 else draw_weights(small_patterned(data, n), weight)


def draw_weights(flags: torch.Tensor, weight: float) -> torch.Tensor | None:
    """`weight` for the flagged rows, 1 for the rest; None when uniform (weight 1)."""
    return None if weight == 1 else 1.0 + (weight - 1.0) * flags.double()


def draw_pool(n: int, b: int, weights: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor:
    """b pool indices, with replacement: uniform, or in proportion to `weights`."""
    if weights is None:
        return torch.randint(n, (b,), generator=gen)
    return torch.multinomial(weights, b, replacement=True, generator=gen)


def epsilon_loss(eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor,
                 min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean over rows of each row's epsilon MSE, weighted by min(SNR, gamma) / SNR when gamma > 0 (Min-SNR)."""
    per_row = (eps - noise).square().mean(dim=tuple(range(1, eps.ndim)))
    if min_snr_gamma:
        a = abar.to(t.device)[t]
        snr = a / (1 - a)
        per_row = per_row * snr.clamp(max=min_snr_gamma) / snr
    return per_row.mean()


class TeacherJob(StageJob):
    """Output: folder/unet (diffusers UNet2DConditionModel)."""

    name = "teacher"

    def __init__(self, cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], accelerator):
        super().__init__(cfg, folder, accelerator)
        self.frozen_dirs = frozen_dirs

    @property
    def optim(self):
        return self.cfg.teacher.optim

    def outputs(self) -> Path:
        return self.folder / "unet"

    def build(self, stage: Stage) -> None:
        cfg, c = self.cfg, self.cfg.teacher
        self.frozen = frozen = load_frozen(self.frozen_dirs, self.acc.device)
        torch.manual_seed(cfg.run.seed)
        self.unet = build_unet(c.unet, cfg.data.image_size // cfg.autoencoder.scale_factor, frozen["text_encoder"].config.hidden_size,
                               frozen["vae"].config.latent_channels)
        if c.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.opt = make_optimizer(self.unet.parameters(), c.optim)
        stage.register("unet", self.unet, self.opt)
        self.ema = moving_average(stage, self.unet, c.ema_decay, "unet_ema")

    def describe(self) -> str:
        return f"{count_params(self.unet) / 1e6:.2f}M params"

    def start(self, stage: Stage) -> None:
        cfg = self.cfg
        self.unet, self.opt = self.acc.prepare(self.unet, self.opt)
        if self.ema is not None:
            self.ema.to(self.acc.device)
        self.abar = alphas_cumprod()
        self.data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
        self.pool = (latent_pool(cfg, self.folder, self.frozen["vae"], self.data, self.acc)
                     if cfg.teacher.latent_pool else None)
        self.pool_weights = (pool_draw_weights(self.data, len(self.pool["prompts"]), cfg.teacher.small_patterned_weight)
                             if self.pool is not None else None)
        self.unet.train()

    def iteration(self, stage: Stage) -> dict[str, float]:
        cfg, c, acc, pool = self.cfg, self.cfg.teacher, self.acc, self.pool
        latent = cfg.data.image_size // cfg.autoencoder.scale_factor
        set_lr(self.opt, c.optim, stage.step)
        gen = stage.gen()

        def micro(i: int):
            idx = batch_indices(stage, c.optim.batch_size, i, c.optim.grad_accum)
            if pool is not None:  # indices into the pre-encoded pool, drawn from this step's generator
                pick = draw_pool(len(pool["prompts"]), len(idx), self.pool_weights, gen)
                x0 = pool["latents"][pick].to(acc.device)
                prompts = [pool["prompts"][j] for j in pick.tolist()]
            else:
                images, prompts = self.data.batch(idx)
                x0 = encode_images(self.frozen["vae"], torch.from_numpy(images).to(acc.device))
            b = len(prompts)
            drop = torch.rand(b, generator=gen) < c.cond_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
            t = torch.randint(0, 1000, (b,), generator=gen)
            noise = torch.randn((b, cfg.autoencoder.latent_channels, latent, latent), generator=gen)
            if c.offset_noise:
                noise = noise + c.offset_noise * torch.randn((b, noise.shape[1], 1, 1), generator=gen)
            t, noise = t.to(x0.device), noise.to(x0.device)
            xt = add_noise(x0, noise, t, self.abar)
            cond = self.frozen["text"](prompts)
            with autocast(acc):
                eps = self.unet(xt, t, **unet_kwargs(cond)).sample
                loss = epsilon_loss(eps.float(), noise, t, self.abar, c.min_snr_gamma)
            return loss, {"loss": loss}

        logs = accumulate(acc, self.unet, c.optim.grad_accum, micro)
        step_optimizer(acc, self.opt, self.unet.parameters(), c.optim)
        if self.ema is not None:
            self.ema.update_parameters(acc.unwrap_model(self.unet))
        return logs

    def save(self) -> None:
        """teacher/unet: the EMA when teacher.ema_decay > 0 (the trained weights then in teacher/unet_raw)."""
        raw = self.acc.unwrap_model(self.unet)
        if self.ema is not None:
            self.ema.module.save_pretrained(self.folder / "unet")
            raw.save_pretrained(self.folder / "unet_raw")
        else:
            raw.save_pretrained(self.folder / "unet")


def train_teacher(cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], accelerator) -> Path:
    return run_stage(TeacherJob(cfg, folder, frozen_dirs, accelerator))
