"""Stage 3: NitroFusion dynamic adversarial training, then bottom-up refinement for 2, 3 and 4 steps.

One iteration (paper Sec. 3.2-3.3):
  1. draw t* and sample one head per (level, task) for it; re-initialise ~1% of the whole pool (refresh);
  2. the student generates: k ~ U{1..phase} steps of the shifted LCM schedule (nitrofusion.sampler, so training
     and inference agree); the first k-1 without gradients (re-noising its own output), the last with them;
  3. generator update: adversarial loss of the sampled heads on the fake x0 (no regression term, as the paper);
  4. discriminator update: the sampled heads on teacher samples (real) vs the detached fake x0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nitrofusion.sampler import LCMSampler

from .config import TrainConfig
from .discriminator import FrozenEncoder, HeadPool, d_loss, encoder_features, g_loss
from .loop import Stage, autocast, set_lr
from .models import alphas_cumprod, count_params
from .stage1 import load_frozen
from .stage2 import cache_batch, load_cache

PHASE1_DIR = "unet_phase1"  # snapshot of the student when phase 1 (one-step training) ends


def student_x0(student, sampler: LCMSampler, noise: torch.Tensor, emb: torch.Tensor, steps: int, shift: int,
               gen: torch.Generator, no_grad_model=None) -> torch.Tensor:
    """k-step generation as inference does it; gradients only through the last step (bottom-up refinement)."""
    sched = sampler.schedule(steps, shift)
    b = noise.shape[0]
    x = noise
    frozen_call = no_grad_model or student
    for j in range(steps):
        t = sched.model_timesteps[j]
        ts = torch.full((b,), t, dtype=torch.long, device=x.device)
        if j < steps - 1:
            with torch.no_grad():
                eps = frozen_call(x, ts, encoder_hidden_states=emb).sample.float()
                x0 = sampler.denoise(x, eps, [t] * b)
                z = torch.randn(x.shape, generator=gen).to(x.device)
                x = sampler.renoise(x0, [sched.levels[j + 1]] * b, z)
        else:
            eps = student(x, ts, encoder_hidden_states=emb).sample.float()
            return sampler.denoise(x, eps, [t] * b)
    raise AssertionError("unreachable")


def train_nitro(cfg: TrainConfig, folder: Path, frozen_dirs: dict[str, Path], teacher_dir: Path, init_dir: Path,
                cache_dir: Path, accelerator) -> Path:
    """Output: folder/unet, the 1-4 step student."""
    from diffusers import UNet2DConditionModel

    c = cfg.nitro
    stage = Stage("nitro", folder, cfg, accelerator, c.optim.steps)
    stage.log_every = c.optim.log_every
    if stage.done:
        return folder / "unet"
    dev = accelerator.device
    frozen = load_frozen(frozen_dirs, dev)
    teacher = UNet2DConditionModel.from_pretrained(teacher_dir)
    encoder = FrozenEncoder(teacher).to(dev)
    text_cfg = frozen["text_encoder"].config
    latent = cfg.data.image_size // 8
    torch.manual_seed(cfg.run.seed)
    pool = HeadPool(c.pool, encoder.shapes(latent, cfg.text.max_length, text_cfg.hidden_size))
    student = UNet2DConditionModel.from_pretrained(init_dir)
    if c.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    opt_g = torch.optim.AdamW(student.parameters(), lr=c.optim.lr, betas=c.optim.betas,
                              weight_decay=c.optim.weight_decay)
    opt_d = torch.optim.AdamW(pool.parameters(), lr=c.lr_disc, betas=(0.0, 0.99))
    stage.register("student", student, opt_g)
    stage.register("pool", pool, opt_d)
    stage.load_checkpoint()
    if accelerator.is_main_process and stage.step == 0:
        print(f"[nitro] student {count_params(student) / 1e6:.2f}M, pool {len(pool)} heads "
              f"({count_params(pool) / 1e6:.2f}M), {len(pool.level_shapes)} feature levels", flush=True)
    student, opt_g, pool, opt_d = accelerator.prepare(student, opt_g, pool, opt_d)
    raw_pool: HeadPool = accelerator.unwrap_model(pool)
    raw_student = accelerator.unwrap_model(student)
    student.train()
    pool.train()
    cache = load_cache(cache_dir)
    sampler = LCMSampler(alphas_cumprod())
    abar = sampler.alphas_cumprod
    uncond_1 = frozen["text"]([""])
    b = c.optim.batch_size
    multi = accelerator.num_processes > 1

    while stage.step < stage.total:
        gen, shared = stage.gen(), stage.shared_gen()
        set_lr(opt_g, c.optim, stage.step)
        # 1. This iteration's t*, head subset and refresh: drawn from a rank-free generator so all ranks agree.
        t_star = c.pool.timesteps[int(torch.randint(len(c.pool.timesteps), (1,), generator=shared))]
        heads = raw_pool.sample(t_star, shared)
        refreshed = raw_pool.refresh(shared, opt_d.optimizer if hasattr(opt_d, "optimizer") else opt_d)
        tasks = raw_pool.tasks_of(heads)
        phase = c.max_steps_at(stage.step)
        steps = 1 + int(torch.randint(phase, (1,), generator=shared))

        _, real, prompts = cache_batch(cache, gen, b)
        real = real.to(dev)
        emb = frozen["text"](prompts)
        uncond = uncond_1.expand(b, -1, -1)
        noise = torch.randn(real.shape, generator=gen).to(dev)

        # 2-3. Generator step.
        with autocast(accelerator):
            fake = student_x0(student, sampler, noise, emb, steps, c.shift, gen, no_grad_model=raw_student)
            feats = encoder_features(encoder, fake, t_star, emb, uncond, tasks, c.pool.crop_fraction, abar, gen)
            # The heads are only judges here: run them outside DDP's gradient sync; their grads are dropped.
            with accelerator.no_sync(pool) if multi else torch.enable_grad():
                loss_g = g_loss(pool(feats, heads), c.loss)
                accelerator.backward(loss_g)
        if c.optim.grad_clip:
            accelerator.clip_grad_norm_(student.parameters(), c.optim.grad_clip)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)

        # 4. Discriminator step(s): real and fake in one batch, so each head runs once per update.
        fake = fake.detach()
        for _ in range(c.disc_steps):
            with autocast(accelerator):
                with torch.no_grad():
                    both = encoder_features(encoder, torch.cat([real, fake]), t_star, torch.cat([emb, emb]),
                                            torch.cat([uncond, uncond]), tasks, c.pool.crop_fraction, abar, gen)
                logits = pool(both, heads)
                loss_d = d_loss({i: v[:b] for i, v in logits.items()}, {i: v[b:] for i, v in logits.items()},
                                c.loss)
                accelerator.backward(loss_d)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

        stage.step += 1
        stage.extra_state["last_refreshed"] = refreshed
        stage.log({"loss_g": loss_g.item(), "loss_d": loss_d.item(), "t_star": t_star, "steps": steps,
                   "heads": len(heads), "refreshed": len(refreshed)})
        if stage.step == c.phase_steps[0] and len(c.phase_steps) > 1 and accelerator.is_main_process:
            # The one-step student before bottom-up refinement: what the 1-step ablations compare against.
            raw_student.save_pretrained(folder / PHASE1_DIR)
        stage.maybe_checkpoint(c.optim.checkpoint_every)
    stage.close()
    if accelerator.is_main_process:
        raw_student.save_pretrained(folder / "unet")
    stage.mark_done()
    return folder / "unet"
