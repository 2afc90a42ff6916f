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
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from nitrofusion.sampler import LCMSampler

from .config import TrainConfig
from .discriminator import FrozenEncoder, HeadPool, d_loss, encoder_features, g_loss
from .loop import Stage, autocast, set_lr
from .models import alphas_cumprod, count_params
from .stage1 import latent_pool, load_frozen, sample_teacher
from .stage2 import cache_batch, load_cache

PHASE1_DIR = "unet_phase1"  # snapshot of the student when phase 1 (one-step training) ends


def student_x0(student, sampler: LCMSampler, noise: torch.Tensor, emb: torch.Tensor, steps: int, shift: int,
               gen: torch.Generator, no_grad_model=None, with_input: bool = False):
    """k-step generation as inference does it; gradients only through the last step (bottom-up refinement).
    with_input: also return the last step's input latents (detached), at noise level schedule.levels[-1]."""
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
                z = torch.randn(x.shape, generator=gen).to(x.device)
                _, x = sampler.step(x, eps, [t] * b, [sched.next_level(j)] * b, z)
        else:
            eps = student(x, ts, encoder_hidden_states=emb).sample.float()
            x0 = sampler.denoise(x, eps, [t] * b)
            return (x0, x.detach()) if with_input else x0
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
    if c.reg_multistep == "teacher":  # the whole teacher (its decoder too) only where it makes k-step targets
        teacher.to(dev).eval().requires_grad_(False)
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
    reals = cache
    if c.real == "data":  # the teacher stage's encoded dataset images (encoded now if that stage kept none)
        if not cfg.teacher.latent_pool:
            raise ValueError("nitro.real=data reads the teacher's latent pool: set teacher.latent_pool > 0")
        from .shapes import ShapesDataset

        data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
        pool_lat = latent_pool(cfg, Path(teacher_dir).parent, frozen["vae"], data, accelerator)
        reals = {"x0": pool_lat["latents"], "prompts": pool_lat["prompts"]}
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

        # Fakes start from fresh noise, or (reg_weight > 0) from cached teacher noises, whose samples are targets.
        pair_noise, target, prompts = cache_batch(cache, gen, b)
        reg = c.reg_weight if steps == 1 or c.reg_multistep != "off" else 0.0
        noise = pair_noise.to(dev) if c.reg_weight else torch.randn(target.shape, generator=gen).to(dev)
        if c.real == "data":
            pick = torch.randint(len(reals["prompts"]), (b,), generator=gen)
            real, real_prompts = reals["x0"][pick], [reals["prompts"][i] for i in pick.tolist()]
        else:
            real, real_prompts = target, prompts
        real, target = real.to(dev), target.to(dev)
        emb = frozen["text"](prompts)
        emb_real = emb if real_prompts is prompts else frozen["text"](real_prompts)
        uncond = uncond_1.expand(b, -1, -1)

        # 2-3. Generator step.
        with autocast(accelerator):
            fake, last_in = student_x0(student, sampler, noise, emb, steps, c.shift, gen, no_grad_model=raw_student,
                                       with_input=True)
            if reg and steps > 1 and c.reg_multistep == "teacher":
                # The teacher's answer for the student's own re-noised input: a well-posed k-step target.
                level = sampler.schedule(steps, c.shift).levels[-1]
                target = sample_teacher(teacher, frozen["text"], prompts, last_in,
                                        max(2, round(cfg.teacher.sample_steps * level / 1000)),
                                        cfg.teacher.guidance_scale, start=level).float()
            feats = encoder_features(encoder, fake, t_star, emb, uncond, tasks, c.pool.crop_fraction, abar, gen)
            # The heads are only judges here: run them outside DDP's gradient sync; their grads are dropped.
            with accelerator.no_sync(pool) if multi else torch.enable_grad():
                loss_adv = g_loss(pool(feats, heads), c.loss)
                loss_reg = F.mse_loss(fake, target) if reg else torch.zeros((), device=dev)
                loss_g = c.adv_weight * loss_adv + reg * loss_reg
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
                    both = encoder_features(encoder, torch.cat([real, fake]), t_star, torch.cat([emb_real, emb]),
                                            torch.cat([uncond, uncond]), tasks, c.pool.crop_fraction, abar, gen)
                logits = pool(both, heads)
                loss_d = d_loss({i: v[:b] for i, v in logits.items()}, {i: v[b:] for i, v in logits.items()},
                                c.loss)
                accelerator.backward(loss_d)
            opt_d.step()
            opt_d.zero_grad(set_to_none=True)

        stage.step += 1
        stage.extra_state["last_refreshed"] = refreshed
        logs = {"loss_g": loss_adv.item(), "loss_d": loss_d.item(), "t_star": t_star, "steps": steps,
                "heads": len(heads), "refreshed": len(refreshed)}
        if c.reg_weight:
            logs["loss_reg"] = loss_reg.item() if reg else float("nan")
        stage.log(logs)
        if stage.step == c.phase_steps[0] and len(c.phase_steps) > 1 and accelerator.is_main_process:
            # The one-step student before bottom-up refinement: what the 1-step ablations compare against.
            raw_student.save_pretrained(folder / PHASE1_DIR)
        if c.snapshot_every and stage.step % c.snapshot_every == 0 and accelerator.is_main_process:
            raw_student.save_pretrained(folder / f"unet_step{stage.step}")
        stage.maybe_checkpoint(c.optim.checkpoint_every)
    stage.close()
    if accelerator.is_main_process:
        raw_student.save_pretrained(folder / "unet")
    stage.mark_done()
    return folder / "unet"
