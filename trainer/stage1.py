"""Stage 1: the teacher, an epsilon-prediction UNet2DConditionModel on VAE latents (SDXL's noise schedule).

Sampled with DPM-Solver++ (2nd order multistep, ~25 steps) and classifier-free guidance; the prompt is dropped
to "" `cond_dropout` of the time in training so the unconditional branch exists.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import TrainConfig
from .loop import Stage, autocast, micro_contexts, set_lr
from .models import NOISE_SCHEDULE, TextEncoderWrapper, add_noise, alphas_cumprod, build_unet, count_params
from .shapes import ShapesDataset
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
    """(B, 3, H, W) in [-1, 1] -> scaled latent means (B, 4, H/8, W/8)."""
    return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def sample_teacher(unet, text: TextEncoderWrapper, prompts: list[str], noise: torch.Tensor, steps: int,
                   guidance: float, start: int | None = None) -> torch.Tensor:
    """DPM-Solver++ with classifier-free guidance; noise (B, 4, h, w) N(0, I) -> x0 latents. `start`: begin from
    a partly noised x_start at that timestep instead (`noise` is then x_start), `steps` evenly spaced down to 0."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(**NOISE_SCHEDULE, prediction_type="epsilon", algorithm_type="dpmsolver++",
                                        solver_order=2, timestep_spacing="trailing")
    if start is None:
        sched.set_timesteps(steps, device=noise.device)
    else:
        sched.set_timesteps(timesteps=[round(start - i * (start + 1) / steps) for i in range(steps)],
                            device=noise.device)
    cond = text(prompts)
    uncond = text([""] * len(prompts))
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        if guidance == 1.0:
            eps = unet(x, t, encoder_hidden_states=cond).sample
        else:
            both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = both.chunk(2)
            eps = e_u + guidance * (e_c - e_u)
        x = sched.step(eps, t, x).prev_sample
    return x


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


def train_teacher(cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], accelerator) -> Path:
    """Output: folder/unet (diffusers UNet2DConditionModel)."""
    c = cfg.teacher
    stage = Stage("teacher", folder, cfg, accelerator, c.optim.steps)
    stage.log_every = c.optim.log_every
    if stage.done:
        return folder / "unet"
    frozen = load_frozen(frozen_dirs, accelerator.device)
    latent = cfg.data.image_size // 8
    torch.manual_seed(cfg.run.seed)
    unet = build_unet(c.unet, latent, frozen["text_encoder"].config.hidden_size, frozen["vae"].config.latent_channels)
    if c.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(unet.parameters(), lr=c.optim.lr, betas=c.optim.betas, weight_decay=c.optim.weight_decay)
    stage.register("unet", unet, opt)
    stage.load_checkpoint()
    if accelerator.is_main_process and stage.step == 0:
        print(f"[teacher] {count_params(unet) / 1e6:.2f}M params", flush=True)
    unet, opt = accelerator.prepare(unet, opt)
    abar = alphas_cumprod()
    data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
    pool = latent_pool(cfg, folder, frozen["vae"], data, accelerator) if c.latent_pool else None
    unet.train()
    while stage.step < stage.total:
        set_lr(opt, c.optim, stage.step)
        gen = stage.gen()
        total = 0.0
        for micro, ctx in micro_contexts(accelerator, unet, c.optim.grad_accum):
            idx = batch_indices(stage, c.optim.batch_size, micro, c.optim.grad_accum)
            if pool is not None:  # indices into the pre-encoded pool, drawn from this step's generator
                pick = torch.randint(len(pool["prompts"]), (len(idx),), generator=gen)
                x0 = pool["latents"][pick].to(accelerator.device)
                prompts = [pool["prompts"][i] for i in pick.tolist()]
            else:
                images, prompts = data.batch(idx)
                x0 = encode_images(frozen["vae"], torch.from_numpy(images).to(accelerator.device))
            b = len(prompts)
            drop = torch.rand(b, generator=gen) < c.cond_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
            t = torch.randint(0, 1000, (b,), generator=gen)
            noise = torch.randn((b, cfg.autoencoder.latent_channels, latent, latent), generator=gen)
            t, noise = t.to(x0.device), noise.to(x0.device)
            xt = add_noise(x0, noise, t, abar)
            ctx_emb = frozen["text"](prompts)
            with ctx, autocast(accelerator):
                eps = unet(xt, t, encoder_hidden_states=ctx_emb).sample
                loss = F.mse_loss(eps.float(), noise) / c.optim.grad_accum
                accelerator.backward(loss)
            total += loss.item()
        stage.optimizer_step(opt, unet.parameters(), c.optim, {"loss": total})
    stage.close()
    if accelerator.is_main_process:
        accelerator.unwrap_model(unet).save_pretrained(folder / "unet")
    stage.mark_done()
    return folder / "unet"
