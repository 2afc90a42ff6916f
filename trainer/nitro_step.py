"""One stage-3 iteration's two halves (paper Sec. 3.2-3.3): the generator step and the discriminator step.

Both read an `Iteration`: the choices shared by every rank (t*, the sampled heads, the step count) and the
iteration's batch. `stage3.NitroJob` builds the networks (`NitroNets`) and draws the iteration; the SDXL training
benchmark (bench/train_sdxl.py) runs these same two functions on the real SDXL architecture.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nitrofusion.sampler import LCMSampler

from .config import NitroConfig
from .discriminator import FrozenEncoder, HeadPool, d_loss, encoder_features, g_loss
from .loop import autocast


@dataclass
class NitroNets:
    """What the two steps run. `student`/`pool` may be DDP-wrapped; `raw_*` are the unwrapped modules."""

    accelerator: object
    student: torch.nn.Module
    raw_student: torch.nn.Module
    encoder: FrozenEncoder
    pool: torch.nn.Module
    raw_pool: HeadPool
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sampler: LCMSampler
    teacher: torch.nn.Module | None = None  # the whole teacher, only for nitro.reg_multistep=teacher
    text: object = None  # prompts -> embeddings, for the teacher's k-step targets

    @property
    def abar(self) -> torch.Tensor:
        return self.sampler.alphas_cumprod


@dataclass
class Iteration:
    """One iteration's choices (the same on every rank) and its batch."""

    t_star: int
    heads: list[int]
    steps: int  # k: the student generates with k steps, gradients through the last
    reg: float  # weight of the L2 anchor this iteration (0: none)
    noise: torch.Tensor  # (B, C, h, w) the student's starting noise
    target: torch.Tensor  # (B, C, h, w) teacher x0 for the L2 anchor
    prompts: list[str]
    emb: torch.Tensor  # (B, L, D) prompt embeddings
    real: torch.Tensor  # (B, C, h, w) the heads' real x0
    emb_real: torch.Tensor
    uncond: torch.Tensor  # (B, L, D) the empty prompt's embeddings
    tasks: set[str] = field(default_factory=set)


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


def generator_step(nets: NitroNets, it: Iteration, c: NitroConfig, gen: torch.Generator, teacher_steps: int = 0,
                   guidance: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Adversarial loss of the sampled heads on the student's x0 (+ reg x the L2 anchor), one AdamW step.
    Returns the detached fakes for the discriminator step and the losses."""
    from .stage1 import sample_teacher

    acc = nets.accelerator
    multi = acc.num_processes > 1
    target = it.target
    with autocast(acc):
        fake, last_in = student_x0(nets.student, nets.sampler, it.noise, it.emb, it.steps, c.shift, gen,
                                   no_grad_model=nets.raw_student, with_input=True)
        if it.reg and it.steps > 1 and c.reg_multistep == "teacher":
            # The teacher's answer for the student's own re-noised input: a well-posed k-step target.
            level = nets.sampler.schedule(it.steps, c.shift).levels[-1]
            target = sample_teacher(nets.teacher, nets.text, it.prompts, last_in,
                                    max(2, round(teacher_steps * level / 1000)), guidance, start=level).float()
        feats = encoder_features(nets.encoder, fake, it.t_star, it.emb, it.uncond, it.tasks, c.pool.crop_fraction,
                                 nets.abar, gen)
        # The heads are only judges here: run them outside DDP's gradient sync; their grads are dropped.
        with acc.no_sync(nets.pool) if multi else torch.enable_grad():
            loss_adv = g_loss(nets.pool(feats, it.heads), c.loss)
            loss_reg = F.mse_loss(fake, target) if it.reg else torch.zeros((), device=fake.device)
            loss_g = c.adv_weight * loss_adv + it.reg * loss_reg
            acc.backward(loss_g)
    if c.optim.grad_clip:
        acc.clip_grad_norm_(nets.student.parameters(), c.optim.grad_clip)
    nets.opt_g.step()
    nets.opt_g.zero_grad(set_to_none=True)
    nets.opt_d.zero_grad(set_to_none=True)
    logs = {"loss_g": loss_adv.item()}
    if c.reg_weight:
        logs["loss_reg"] = loss_reg.item() if it.reg else float("nan")
    return fake.detach(), logs


def discriminator_step(nets: NitroNets, it: Iteration, fake: torch.Tensor, c: NitroConfig,
                       gen: torch.Generator) -> dict[str, float]:
    """`c.disc_steps` updates of the sampled heads: real and fake in one batch, so each head runs once per update."""
    acc = nets.accelerator
    b = fake.shape[0]
    for _ in range(c.disc_steps):
        with autocast(acc):
            with torch.no_grad():
                both = encoder_features(nets.encoder, torch.cat([it.real, fake]), it.t_star,
                                        torch.cat([it.emb_real, it.emb]), torch.cat([it.uncond, it.uncond]),
                                        it.tasks, c.pool.crop_fraction, nets.abar, gen)
            logits = nets.pool(both, it.heads)
            loss_d = d_loss({i: v[:b] for i, v in logits.items()}, {i: v[b:] for i, v in logits.items()}, c.loss)
            acc.backward(loss_d)
        nets.opt_d.step()
        nets.opt_d.zero_grad(set_to_none=True)
    return {"loss_d": loss_d.item()}
