"""Rows and the step loop: many requests, each at its own step of its own 1-4 step schedule, one UNet call.

Each request owns a CPU `torch.Generator` seeded with its seed and draws its noise in the reference
order (initial latents, then one draw per re-noise), so a seed gives the same image alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .backends.base import Backend, Conditioning
from .sampler import LCMSampler, Schedule


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    steps: int
    seed: int
    width: int
    height: int


@dataclass
class Row:
    """One image in flight: its latents, where it is in its schedule, and its own noise generator."""

    request: GenerationRequest
    schedule: Schedule
    generator: torch.Generator
    latents: torch.Tensor  # (1, C, h, w) fp32
    cond: Conditioning | None = None
    step: int = 0
    x0: torch.Tensor | None = None  # the last step's predicted clean latents (progressive preview)
    extras: dict = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step >= self.schedule.steps

    @property
    def size_key(self) -> tuple[int, int]:
        return (self.request.width, self.request.height)


def new_row(request: GenerationRequest, sampler: LCMSampler, backend: Backend, shift: int) -> Row:
    """Draw the initial noise exactly as the diffusers pipeline does (init_noise_sigma = 1 for LCM)."""
    generator = torch.Generator("cpu").manual_seed(request.seed)
    f = backend.vae_scale_factor
    shape = (1, backend.latent_channels, request.height // f, request.width // f)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32)
    return Row(request, sampler.schedule(request.steps, shift), generator, latents)


def attach_conditioning(backend: Backend, rows: list[Row]) -> None:
    """Batched text encoding for newly admitted rows (cached per prompt inside the backend)."""
    todo = [r for r in rows if r.cond is None]
    if not todo:
        return
    cond = backend.encode_text([r.request.prompt for r in todo], [r.size_key for r in todo])
    for i, r in enumerate(todo):
        r.cond = cond.row(i)


def step_rows(backend: Backend, sampler: LCMSampler, rows: list[Row], pad_to: int | None = None) -> None:
    """Advance every row by one step with ONE UNet call. All rows must share a latent size.

    `pad_to` repeats the last row to a declared batch bucket (GPU backends replay one graph per bucket);
    padded outputs are dropped, so padding never changes a row's result beyond kernel-level float noise.
    """
    assert rows and all(r.size_key == rows[0].size_key for r in rows), "rows in one call must share a size"
    attach_conditioning(backend, rows)
    latents = torch.cat([r.latents for r in rows])  # (B, C, h, w)
    timesteps = [r.schedule.model_timesteps[r.step] for r in rows]
    cond = Conditioning.cat([r.cond for r in rows])  # type: ignore[misc]
    n = len(rows)
    if pad_to is not None and pad_to > n:
        extra = pad_to - n
        latents = torch.cat([latents, latents[-1:].expand(extra, -1, -1, -1)])
        timesteps = timesteps + [timesteps[-1]] * extra
        cond = Conditioning.cat([cond] + [cond.row(n - 1)] * extra)
    eps = backend.unet(latents, timesteps, cond)[:n].to(rows[0].latents.device)
    next_levels = [r.schedule.next_level(r.step) for r in rows]
    noise = None
    if any(lvl >= 0 for lvl in next_levels):
        # Each row draws from its own CPU generator in the reference order (one draw per re-noise), so a seed
        # gives the same image alone or in any batch; finishing rows draw nothing and get zeros.
        noise = torch.cat([torch.randn(r.latents.shape, generator=r.generator, dtype=torch.float32) if lvl >= 0
                           else torch.zeros(r.latents.shape) for r, lvl in zip(rows, next_levels)])
    x0, x_next = sampler.step(latents[:n], eps, timesteps[:n], next_levels, noise)
    for i, row in enumerate(rows):
        row.x0 = x0[i : i + 1]
        row.latents = x_next[i : i + 1]
        row.step += 1


def generate(backend: Backend, sampler: LCMSampler, requests: list[GenerationRequest], shift: int,
             max_batch: int = 16) -> list[np.ndarray]:
    """Run requests to completion, batching rows of equal size; returns (H, W, 3) uint8 images in order."""
    rows = [new_row(r, sampler, backend, shift) for r in requests]
    groups: dict[tuple[int, int], list[Row]] = {}
    for r in rows:
        groups.setdefault(r.size_key, []).append(r)
    for group in groups.values():
        for start in range(0, len(group), max_batch):
            chunk = group[start : start + max_batch]
            while active := [r for r in chunk if not r.done]:
                step_rows(backend, sampler, active)
            images = backend.decode(torch.cat([r.latents for r in chunk]))
            for r, img in zip(chunk, images):
                r.extras["image"] = img
    return [r.extras["image"] for r in rows]
