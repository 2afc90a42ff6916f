"""Timestep-shift LCM sampling for 1-4 steps with the same weights (NitroFusion's inference recipe).

The UNet is called at the *shifted* timestep t_s = floor(t * S / T) while re-noising uses the unshifted
LCM levels t. This reproduces diffusers' `LCMScheduler` subclass from the official NitroFusion README
(`TimestepShiftLCMScheduler`, original_inference_steps = 4) but works per row, so rows at different
steps of different schedules can share one UNet call, each with its own generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import LCMScheduler

from .transfer import to_device

MIN_STEPS = 1
MAX_STEPS = 4
DEFAULT_SHIFT = 250
# LCM's boundary-condition constants (diffusers' LCMScheduler: sigma_data = 0.5, timestep_scaling = 10).
SIGMA_DATA = 0.5


@dataclass(frozen=True)
class Schedule:
    """One request's schedule: UNet timesteps (shifted) and the unshifted re-noise levels."""

    steps: int
    shift: int
    levels: tuple[int, ...]  # unshifted noise levels, e.g. (999, 749, 499, 249) for 4 steps
    model_timesteps: tuple[int, ...]  # what the UNet sees, e.g. (249, 187, 124, 62) for S = 250

    def next_level(self, step: int) -> int:
        """The unshifted level the sample is re-noised to after `step`, or -1 after the last step."""
        return self.levels[step + 1] if step + 1 < self.steps else -1


def make_schedule(
    steps: int, shift: int, num_train_timesteps: int = 1000, original_steps: int = 4
) -> Schedule:
    """LCM's inference schedule (as `LCMScheduler.set_timesteps`) plus the NitroFusion timestep shift."""
    if not MIN_STEPS <= steps <= min(MAX_STEPS, original_steps):
        raise ValueError(f"steps must be between {MIN_STEPS} and {min(MAX_STEPS, original_steps)}, got {steps}")
    if not 0 < shift <= num_train_timesteps:
        raise ValueError(f"shift must be in (0, {num_train_timesteps}], got {shift}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]  # (999, 749, 499, 249)
    indices = np.floor(np.linspace(0, original_steps, num=steps, endpoint=False)).astype(np.int64)
    levels = tuple(int(t) for t in origin[indices])
    # Same integer arithmetic as the reference: (t * S / T).long() truncates toward zero.
    shifted = tuple(int(t * shift / num_train_timesteps) for t in levels)
    return Schedule(steps=steps, shift=shift, levels=levels, model_timesteps=shifted)


class LCMSampler:
    """Per-row LCM update: x0 from the model output, boundary condition, re-noise to the next level."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        timestep_scaling: float = 10.0,
        num_train_timesteps: int = 1000,
        original_steps: int = 4,
    ):
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.to(torch.float32).cpu()  # (T,)
        self.prediction_type = prediction_type
        self.timestep_scaling = timestep_scaling
        self.num_train_timesteps = num_train_timesteps
        self.original_steps = original_steps

    @classmethod
    def from_scheduler_config(cls, config: dict) -> LCMSampler:
        """Build from a model folder's scheduler config (any diffusers scheduler: betas are what matter)."""
        lcm = LCMScheduler.from_config(config)  # diffusers computes the noise schedule from the betas
        return cls(
            lcm.alphas_cumprod,
            prediction_type=lcm.config.prediction_type,
            timestep_scaling=lcm.config.timestep_scaling,
            num_train_timesteps=lcm.config.num_train_timesteps,
        )

    def schedule(self, steps: int, shift: int) -> Schedule:
        return make_schedule(steps, shift, self.num_train_timesteps, self.original_steps)

    def boundary_scalings(self, timesteps: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """LCM's c_skip, c_out per row (negligible at these t, but the reference applies them)."""
        c_skip, c_out = [], []
        for t in timesteps:
            scaled = t * self.timestep_scaling
            c_skip.append(SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2))
            c_out.append(scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5)
        return torch.tensor(c_skip, dtype=torch.float32), torch.tensor(c_out, dtype=torch.float32)

    def denoise(self, sample: torch.Tensor, model_output: torch.Tensor, timesteps: list[int]) -> torch.Tensor:
        """The LCM 'denoised' x0 for each row; sample and model_output are (B, C, h, w)."""
        t = torch.tensor(timesteps, dtype=torch.long)
        alpha = self.alphas_cumprod[t]  # (B,)
        beta = 1 - alpha
        c_skip, c_out = self.boundary_scalings(timesteps)

        def per_row(v: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, 1, 1, 1) on the sample's device
            # pinned: a host-to-device copy of a few floats must not wait for the queued UNet call
            return to_device(v, sample.device, sample.dtype).view(-1, *([1] * (sample.ndim - 1)))

        if self.prediction_type == "epsilon":
            x0 = (sample - per_row(beta.sqrt()) * model_output) / per_row(alpha.sqrt())
        elif self.prediction_type == "v_prediction":
            x0 = per_row(alpha.sqrt()) * sample - per_row(beta.sqrt()) * model_output
        else:
            x0 = model_output
        return per_row(c_out) * x0 + per_row(c_skip) * sample

    def step(self, sample: torch.Tensor, model_output: torch.Tensor, timesteps: list[int], next_levels: list[int],
             noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One LCM step for every row: (x0, x_next). Denoise at each row's model timestep, then re-noise x0 to
        the row's next *unshifted* level with that row's noise; a row whose next level is -1 (its last step)
        gets x_next = x0 exactly. The one place this maths lives: the engine's step loop, the trainer and the
        Triton `sampler_step` kernel's reference all call it. `noise` (B, C, h, w) is needed when any row
        re-noises; its rows for finishing rows are ignored."""
        if len(timesteps) != sample.shape[0] or len(next_levels) != sample.shape[0]:
            raise ValueError(f"need one timestep and one next level per row ({sample.shape[0]})")
        x0 = self.denoise(sample, model_output, timesteps)  # (B, C, h, w)
        has_next = torch.tensor(next_levels) >= 0  # (B,)
        if not has_next.any():
            return x0, x0
        if noise is None or noise.shape != sample.shape:
            raise ValueError("rows that re-noise need noise shaped like the sample")
        renoised = self.renoise(x0, [max(lvl, 0) for lvl in next_levels], to_device(noise, x0.device, x0.dtype))
        keep = to_device(has_next, x0.device).view(-1, *([1] * (x0.ndim - 1)))
        return x0, torch.where(keep, renoised, x0)

    def renoise(self, denoised: torch.Tensor, levels: list[int], noise: torch.Tensor) -> torch.Tensor:
        """x_next = sqrt(abar[t_next]) * x0 + sqrt(1 - abar[t_next]) * z, per row."""
        alpha = self.alphas_cumprod[torch.tensor(levels, dtype=torch.long)]  # (B,)
        shape = (-1, *([1] * (denoised.ndim - 1)))
        a = to_device(alpha.sqrt(), denoised.device, denoised.dtype).view(shape)
        b = to_device((1 - alpha).sqrt(), denoised.device, denoised.dtype).view(shape)
        return a * denoised + b * noise
