"""Distribution matching (DMD: Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation";
DMD2, the one-step model the NitroFusion paper starts from, adds GAN terms to it): an optional stage-3 term
(`nitro.dmd_weight` > 0).

The student's x0 is noised to a random level t; the frozen teacher (classifier-free guided: the "real" score) and a
second UNet trained online on the student's own outputs (the "fake" score) each predict x0 from it. Their
difference is the gradient of the KL divergence between the student's and the teacher's distributions (at that
noise level), which the student follows: unlike the L2 anchor, which regresses each noise to its teacher sample
and averages where the one-step mapping is uncertain, it is mode-seeking, so thin stripes and corners are not
blurred toward their mean. Normalised per row by the mean |x0 - real prediction| (DMD's own choice), and applied as
0.5 ||x0 - stopgrad(x0 - grad)||^2, so its gradient on x0 is exactly `grad` (divided by the element count).

The fake score starts as the teacher and is trained with the teacher's objective (epsilon MSE, conditional, no
guidance) on the detached fakes, `nitro.dmd_fake_steps` updates an iteration (DMD2: 5, its two time-scale rule).
All randomness (levels, noises) is drawn up front with the iteration's other draws (`DMDDraws`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .conditioning import Conditioning, unet_kwargs
from .models import add_noise, x0_from_eps
from .stage1 import guided_eps


@dataclass
class DMDDraws:
    """One iteration's DMD randomness, per row: the generator term's level and noise, then per fake-score update
    its level and noise."""

    t: torch.Tensor  # (B,) long
    noise: torch.Tensor  # (B, C, h, w)
    fake_t: list[torch.Tensor]  # dmd_fake_steps x (B,)
    fake_noise: list[torch.Tensor]  # dmd_fake_steps x (B, C, h, w)

    @classmethod
    def draw(cls, gen: torch.Generator, shape: tuple[int, ...], t_range: tuple[int, int], fake_steps: int) -> DMDDraws:
        lo, hi = t_range

        def level():
            return torch.randint(lo, hi + 1, (shape[0],), generator=gen)

        t, noise = level(), torch.randn(shape, generator=gen)
        fake_t, fake_noise = [], []
        for _ in range(fake_steps):
            fake_t.append(level())
            fake_noise.append(torch.randn(shape, generator=gen))
        return cls(t, noise, fake_t, fake_noise)

    def rows(self, i: slice) -> DMDDraws:
        return DMDDraws(self.t[i], self.noise[i], [t[i] for t in self.fake_t], [z[i] for z in self.fake_noise])


@torch.no_grad()
def dmd_direction(teacher, fake_score, x0: torch.Tensor, cond: Conditioning, uncond: Conditioning,
                  t: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, guidance: float) -> torch.Tensor:
    """The distribution-matching gradient on x0 (B, C, h, w): (fake x0 prediction - real x0 prediction), divided
    per row by mean |x0 - real prediction|. Following it (x0 - grad) moves x0 toward where the guided teacher puts
    mass and away from where the student already does."""
    x0 = x0.detach().float()
    ts = t.to(x0.device)
    x_t = add_noise(x0, noise.to(x0.device, x0.dtype), ts, abar)
    eps_real = guided_eps(teacher, x_t.to(next(teacher.parameters()).dtype), ts, cond, uncond, guidance).float()
    eps_fake = fake_score(x_t.to(next(fake_score.parameters()).dtype), ts, **unet_kwargs(cond)).sample.float()
    real, fake = x0_from_eps(x_t, eps_real, ts, abar), x0_from_eps(x_t, eps_fake, ts, abar)
    scale = (x0 - real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True).clamp_min(1e-6)
    return torch.nan_to_num((fake - real) / scale)


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """0.5 ||x0 - stopgrad(x0 - grad)||^2 (mean): its gradient on x0 is grad / x0.numel()."""
    return 0.5 * F.mse_loss(x0.float(), (x0.detach().float() - grad).detach())


def fake_score_loss(fake_score, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor,
                    abar: torch.Tensor) -> torch.Tensor:
    """The fake score's denoising loss on the student's detached outputs: the teacher's own objective."""
    x0 = x0.detach().float()
    noise, ts = noise.to(x0.device, x0.dtype), t.to(x0.device)
    eps = fake_score(add_noise(x0, noise, ts, abar), ts, **unet_kwargs(cond)).sample.float()
    return F.mse_loss(eps, noise)
