"""One stage-3 iteration's two halves (paper Sec. 3.2-3.3): the generator step and the discriminator step.

Both read a `Plan` (the choices every rank shares: t*, the sampled heads, the step count) and a `Batch` (the
iteration's rows and all of their randomness, drawn up front). A batch of k x n rows runs as k micro-batches of
n with gradients accumulated (`nitro.optim.grad_accum`; the paper: 5 x 20): every micro-batch takes its rows of
the one batch, so the update equals the one a k x n batch would give, up to float summation order. Conditioning is
a `Conditioning` (embeddings, plus SDXL's pooled embedding and time ids). `stage3.NitroJob` builds the networks and
draws each iteration from the teacher cache; bench/train_sdxl.py runs these same functions on SDXL.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nitrofusion.sampler import LCMSampler

from .conditioning import Conditioning, expand, rows, unet_kwargs
from .config import NitroConfig
from .discriminator import (
    COND_TASKS,
    FrozenEncoder,
    HeadPool,
    Views,
    d_loss,
    encoder_features,
    g_loss,
    head_accuracy,
)
from .dmd import DMDDraws, dmd_direction, dmd_loss, fake_score_loss
from .loop import autocast, micro_contexts


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
    ema: torch.nn.Module | None = None  # torch.optim.swa_utils.AveragedModel of the student (nitro.ema_decay)
    teacher: torch.nn.Module | None = None  # the whole teacher, only for nitro.reg_multistep=teacher
    teacher_sampler: object = None  # stage1.TeacherSampler: the teacher's k-step targets
    # nitro.dmd_weight > 0 (trainer/dmd.py): the online fake score (maybe DDP-wrapped), unwrapped, its optimizer
    fake_score: torch.nn.Module | None = None
    raw_fake_score: torch.nn.Module | None = None
    opt_fake: torch.optim.Optimizer | None = None

    @property
    def abar(self) -> torch.Tensor:
        return self.sampler.alphas_cumprod


@dataclass
class Plan:
    """One iteration's choices, the same on every rank (drawn from the rank-free generator)."""

    t_star: int
    heads: list[int]
    steps: int  # k: the student generates with k steps, gradients through the last
    reg: float  # weight of the L2 anchor this iteration (0: none)
    tasks: set[str] = field(default_factory=set)
    adv: float | None = None  # weight of the adversarial term this iteration (None: nitro.adv_weight)


@dataclass
class Batch:
    """One iteration's rows (grad_accum x batch_size of them) and all their randomness."""

    noise: torch.Tensor  # (B, C, h, w) the student's starting noise
    target: torch.Tensor  # (B, C, h, w) teacher x0 for the L2 anchor
    prompts: list[str]
    cond: Conditioning
    real: torch.Tensor  # (B, C, h, w) the heads' real x0
    real_cond: Conditioning
    uncond: Conditioning  # the empty prompt's, B rows
    renoise: list[torch.Tensor]  # steps - 1 x (B, C, h, w): fresh noise of each re-noising
    g_views: Views  # the generator step's look at the fakes
    d_views: list[tuple[Views, Views]]  # per discriminator update: (reals, fakes)
    dmd: DMDDraws | None = None  # nitro.dmd_weight > 0: the DMD term's and the fake score's draws

    def __len__(self) -> int:
        return self.noise.shape[0]

    def disc(self) -> DiscBatch:
        return DiscBatch(self.real, self.real_cond, self.cond, self.uncond, self.d_views)

    def rows(self, i: slice) -> Batch:
        return Batch(self.noise[i], self.target[i], self.prompts[i], rows(self.cond, i), self.real[i],
                     rows(self.real_cond, i), rows(self.uncond, i), [z[i] for z in self.renoise],
                     self.g_views.rows(i), [(r.rows(i), f.rows(i)) for r, f in self.d_views],
                     None if self.dmd is None else self.dmd.rows(i))


@dataclass
class DiscBatch:
    """What the discriminator step reads of a batch: reals with their prompts, the fakes' prompts, the empty
    prompt per row, and one (reals, fakes) view per discriminator update. `Batch.disc()` gives this iteration's;
    `with_past` appends earlier iterations' fakes (nitro.pool.replay)."""

    real: torch.Tensor
    real_cond: Conditioning
    cond: Conditioning  # the fakes' prompts
    uncond: Conditioning
    d_views: list[tuple[Views, Views]]
    fresh: int | None = None  # rows [:fresh] are this iteration's; the logged accuracy counts only them

    def __len__(self) -> int:
        return self.real.shape[0]

    def rows(self, i: slice) -> DiscBatch:
        return DiscBatch(self.real[i], rows(self.real_cond, i), rows(self.cond, i), rows(self.uncond, i),
                         [(r.rows(i), f.rows(i)) for r, f in self.d_views])

    def with_past(self, fake: torch.Tensor, past: list[tuple[torch.Tensor, Conditioning]], real: torch.Tensor,
                  real_cond: Conditioning, gen: torch.Generator, tasks: set[str],
                  crop_fraction: float) -> tuple[DiscBatch, torch.Tensor]:
        """This batch (with its fakes `fake`) followed by the fakes of earlier iterations (`past`: detached x0 and
        their prompts) against as many more reals (`real`, `real_cond`), each extra row with fresh views drawn from
        `gen`. Returns the longer batch and its fakes."""
        old_fake = torch.cat([f for f, _ in past])
        n = old_fake.shape[0]
        if real.shape[0] != n:
            raise ValueError(f"{n} past fakes need as many reals, got {real.shape[0]}")
        views = []
        for r, f in self.d_views:
            er, ef = Views.draw(gen, (2 * n, *old_fake.shape[1:]), tasks, crop_fraction).split(n)
            views.append((Views.cat(r, er), Views.cat(f, ef)))
        uncond = expand(self.uncond.row(0), len(self) + n)  # the empty prompt: every row's is the same
        longer = DiscBatch(torch.cat([self.real, real.to(self.real.device, self.real.dtype)]),
                           Conditioning.cat([self.real_cond, real_cond]),
                           Conditioning.cat([self.cond, *(c for _, c in past)]), uncond, views, len(self))
        return longer, torch.cat([fake, old_fake.to(fake.device, fake.dtype)])


def draw_noises(gen: torch.Generator, shape: tuple[int, ...], plan: Plan, c: NitroConfig):
    """The iteration's noise after its data: re-noising z per extra step, then the generator's view of the fakes,
    then one (real, fake) view per discriminator update; in the order the steps consume them."""
    renoise = [torch.randn(shape, generator=gen) for _ in range(plan.steps - 1)]
    g_views = Views.draw(gen, shape, plan.tasks, c.pool.crop_fraction)
    both = (2 * shape[0], *shape[1:])
    d_views = [Views.draw(gen, both, plan.tasks, c.pool.crop_fraction).split(shape[0]) for _ in range(c.disc_steps)]
    return renoise, g_views, d_views


def student_x0(student, sampler: LCMSampler, noise: torch.Tensor, cond: Conditioning, steps: int, shift: int,
               renoise: list[torch.Tensor], no_grad_model=None, with_input: bool = False):
    """k-step generation as inference does it; gradients only through the last step (bottom-up refinement), so
    memory is one UNet forward's whatever k is. with_input: also return the last step's input latents
    (detached), at noise level schedule.levels[-1]."""
    sched = sampler.schedule(steps, shift)
    b = noise.shape[0]
    x = noise
    frozen_call = no_grad_model or student
    kwargs = unet_kwargs(cond)
    for j in range(steps):
        t = sched.model_timesteps[j]
        ts = torch.full((b,), t, dtype=torch.long, device=x.device)
        if j < steps - 1:
            with torch.no_grad():
                eps = frozen_call(x, ts, **kwargs).sample.float()
                _, x = sampler.step(x, eps, [t] * b, [sched.next_level(j)] * b, renoise[j].to(x.device))
        else:
            eps = student(x, ts, **kwargs).sample.float()
            x0 = sampler.denoise(x, eps, [t] * b)
            return (x0, x.detach()) if with_input else x0
    raise AssertionError("unreachable")


def micro_slices(total: int, n: int) -> list[slice]:
    if total % n:
        raise ValueError(f"a batch of {total} rows does not split into micro-batches of {n}")
    return [slice(i, i + n) for i in range(0, total, n)]


def generator_backward(nets: NitroNets, plan: Plan, batch: Batch, c: NitroConfig,
                       micro: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Gradients of adv_weight x the sampled heads' adversarial loss on the student's x0 (+ reg x the L2 anchor)
    into the student, micro-batch by micro-batch. Returns the detached fakes (B, C, h, w) and the mean losses."""
    acc = nets.accelerator
    multi = acc.num_processes > 1
    parts = micro_slices(len(batch), micro)
    upto = nets.raw_pool.deepest(plan.heads)
    fakes, adv, reg_sum, dmd_sum = [], 0.0, 0.0, 0.0
    dmd_on = c.dmd_weight > 0 and batch.dmd is not None
    guidance = c.dmd_guidance or (nets.teacher_sampler.guidance if nets.teacher_sampler else 1.0)
    for (_, ctx), sl in zip(micro_contexts(acc, nets.student, len(parts)), parts):
        mb = batch.rows(sl)
        target = mb.target
        with ctx, autocast(acc):
            fake, last_in = student_x0(nets.student, nets.sampler, mb.noise, mb.cond, plan.steps, c.shift,
                                       mb.renoise, no_grad_model=nets.raw_student, with_input=True)
            if plan.reg and plan.steps > 1 and c.reg_multistep == "teacher":
                # The teacher's answer for the student's own re-noised input: a well-posed k-step target.
                level = nets.sampler.schedule(plan.steps, c.shift).levels[-1]
                ts = nets.teacher_sampler
                target = ts(nets.teacher, mb.cond, mb.uncond, last_in, start=level,
                            steps=max(2, round(ts.steps * level / 1000))).float()
            feats = encoder_features(nets.encoder, fake, plan.t_star, mb.cond, mb.uncond, plan.tasks, nets.abar,
                                     mb.g_views, upto)
            # The heads are only judges here: run them outside DDP's gradient sync; their grads are dropped.
            with acc.no_sync(nets.pool) if multi else torch.enable_grad():
                loss_adv = g_loss(nets.pool(feats, plan.heads), c.loss, c.pool.reduce)
                loss_reg = F.mse_loss(fake, target) if plan.reg else torch.zeros((), device=fake.device)
                adv_weight = c.adv_weight if plan.adv is None else plan.adv
                loss_g = adv_weight * loss_adv + plan.reg * loss_reg
                if dmd_on:
                    grad = dmd_direction(nets.teacher, nets.raw_fake_score, fake, mb.cond, mb.uncond, mb.dmd.t,
                                         mb.dmd.noise, nets.abar, guidance)
                    loss_dmd = dmd_loss(fake, grad)
                    loss_g = loss_g + c.dmd_weight * loss_dmd
                    dmd_sum += loss_dmd.item() / len(parts)
                acc.backward(loss_g / len(parts))
        fakes.append(fake.detach())
        adv += loss_adv.item() / len(parts)
        reg_sum += loss_reg.item() / len(parts)
    logs = {"loss_g": adv}
    if c.reg_weight:
        logs["loss_reg"] = reg_sum if plan.reg else float("nan")
    if dmd_on:
        logs["loss_dmd"] = dmd_sum
    return torch.cat(fakes), logs


def generator_step(nets: NitroNets, plan: Plan, batch: Batch, c: NitroConfig,
                   micro: int) -> tuple[torch.Tensor, dict[str, float]]:
    """`generator_backward`, then one optimizer step of the student (and its EMA, when on)."""
    fake, logs = generator_backward(nets, plan, batch, c, micro)
    acc = nets.accelerator
    if c.optim.grad_clip:
        acc.clip_grad_norm_(nets.student.parameters(), c.optim.grad_clip)
    nets.opt_g.step()
    nets.opt_g.zero_grad(set_to_none=True)
    nets.opt_d.zero_grad(set_to_none=True)  # the judges' gradients from the generator loss are not theirs to keep
    if nets.ema is not None:
        nets.ema.update_parameters(nets.raw_student)
    return fake, logs


def discriminator_backward(nets: NitroNets, plan: Plan, batch: Batch | DiscBatch, fake: torch.Tensor,
                           c: NitroConfig, micro: int, update: int = 0) -> dict[str, float]:
    """Gradients of the sampled heads' loss, reals vs the detached fakes, for discriminator update `update`; real
    and fake rows in one batch, so each head runs once per micro-batch. Returns the mean loss and the heads'
    accuracy on reals and on fakes (before this update: what the heads knew when they judged)."""
    acc = nets.accelerator
    batch = batch.disc() if isinstance(batch, Batch) else batch
    parts = micro_slices(len(batch), micro)
    # replayed rows (nitro.pool.replay) train the heads but are not counted: the heads have judged them before
    own = len(batch) if batch.fresh is None else batch.fresh
    fresh = [sl.stop <= own for sl in parts]
    cond_heads = [h for h in plan.heads if nets.raw_pool.slot_of(h)[2] in COND_TASKS]
    mismatch = c.pool.mismatch > 0 and bool(cond_heads)
    upto = nets.raw_pool.deepest(plan.heads)
    total, acc_real, acc_fake, acc_mis = 0.0, 0.0, 0.0, 0.0
    for (_, ctx), sl, counted in zip(micro_contexts(acc, nets.pool, len(parts)), parts, fresh):
        mb = batch.rows(sl)
        real_views, fake_views = mb.d_views[update]
        n = mb.real.shape[0]
        with ctx, autocast(acc):
            with torch.no_grad():
                both = encoder_features(nets.encoder, torch.cat([mb.real, fake[sl]]), plan.t_star,
                                        Conditioning.cat([mb.real_cond, mb.cond]),
                                        Conditioning.cat([mb.uncond, mb.uncond]), plan.tasks, nets.abar,
                                        Views.cat(real_views, fake_views), upto)
                if mismatch:  # the reals again, with the next row's prompt (over the whole batch, so micro-batches
                    # pair rows as one batch would), through the prompt-conditioned tasks only; a repeated prompt
                    # among a batch's rows is rare in these grammars
                    other = (torch.arange(sl.start, sl.stop) + 1) % len(batch)
                    # the reals' own rows of the pass above: the same noisy input, so the encoder's prompt-free
                    # levels are reused (the shapes recipe's: levels 0-4 of the 6 its heads read)
                    own = {t: [f[:n] for f in both[t]] for t in COND_TASKS if t in both}
                    wrong = encoder_features(nets.encoder, mb.real, plan.t_star, rows(batch.real_cond, other),
                                             mb.uncond, plan.tasks & set(COND_TASKS), nets.abar, real_views, upto, own)
                    # appended to those tasks' rows, so the pool still runs once (one DDP forward per backward)
                    both = {t: [torch.cat(pair) for pair in zip(f, wrong[t])] if t in wrong else f
                            for t, f in both.items()}
            logits = nets.pool(both, plan.heads, learn=True)
            real, fake_logits = {i: v[:n] for i, v in logits.items()}, {i: v[n:2 * n] for i, v in logits.items()}
            mis = {i: logits[i][2 * n:] for i in cond_heads} if mismatch else None
            loss_d = d_loss(real, fake_logits, c.loss, c.pool.reduce, mis, c.pool.mismatch)
            acc.backward(loss_d / len(parts))
        total += loss_d.item() / len(parts)
        if not counted:
            continue
        hit_r, hit_f = head_accuracy(real, fake_logits)
        acc_real += hit_r / sum(fresh)
        acc_fake += hit_f / sum(fresh)
        if mismatch:
            acc_mis += head_accuracy(mis, mis)[1] / sum(fresh)
    logs = {"loss_d": total, "acc_real": acc_real, "acc_fake": acc_fake}
    if c.pool.mismatch > 0:
        logs["acc_mismatch"] = acc_mis if mismatch else float("nan")
    return logs


def discriminator_step(nets: NitroNets, plan: Plan, batch: Batch | DiscBatch, fake: torch.Tensor,
                       c: NitroConfig, micro: int) -> dict[str, float]:
    """`c.disc_steps` updates of the sampled heads on this batch. Logs the first update's loss and accuracy: what the
    heads make of rows they have not trained on. The last update's (logged until 2026-12-01) judged rows the heads
    had just fitted disc_steps - 1 times: with 4 updates it read 0.6-0.8 where heads shown fresh latents sat near
    chance (bench/head_probe.py; docs/training.md, round 8)."""
    logs = None
    for update in range(c.disc_steps):
        step_logs = discriminator_backward(nets, plan, batch, fake, c, micro, update)
        logs = logs or step_logs
        nets.opt_d.step()
        nets.opt_d.zero_grad(set_to_none=True)
    return logs


def fake_score_step(nets: NitroNets, batch: Batch, fake: torch.Tensor, c: NitroConfig, micro: int) -> dict[str, float]:
    """nitro.dmd_fake_steps updates of the DMD fake score on this iteration's detached fakes (trainer/dmd.py), each
    at its own drawn levels and noise. Logs the first update's loss (on outputs it has not trained on)."""
    acc = nets.accelerator
    parts = micro_slices(len(batch), micro)
    first = None
    for u in range(c.dmd_fake_steps):
        total = 0.0
        for (_, ctx), sl in zip(micro_contexts(acc, nets.fake_score, len(parts)), parts):
            mb = batch.rows(sl)
            with ctx, autocast(acc):
                loss = fake_score_loss(nets.fake_score, fake[sl], mb.cond, mb.dmd.fake_t[u], mb.dmd.fake_noise[u],
                                       nets.abar)
                acc.backward(loss / len(parts))
            total += loss.item() / len(parts)
        if c.optim.grad_clip:
            acc.clip_grad_norm_(nets.fake_score.parameters(), c.optim.grad_clip)
        nets.opt_fake.step()
        nets.opt_fake.zero_grad(set_to_none=True)
        first = total if first is None else first
    return {"loss_fake": first}
