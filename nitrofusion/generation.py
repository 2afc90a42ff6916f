"""Rows and the step loop: many requests, each at its own step of its own 1-4 step schedule, one UNet call.

Each request owns a CPU `torch.Generator` seeded with its seed and draws its noise in the reference
order (initial latents, then one draw per re-noise), so a seed gives the same image alone or in any batch.
Only the draws happen on the CPU: rows keep their latents on the backend's device from admission to decode,
and each step copies its batch of fresh noise over once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .backends.base import Backend, Conditioning
from .sampler import LCMSampler, Schedule
from .transfer import to_device


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    steps: int
    seed: int
    width: int
    height: int
    decoder: str = "full"  # "full": the model's VAE decoder; "fast": its tiny decoder (vae_preview/)


@dataclass(eq=False)
class Row:
    """One image in flight: its latents, where it is in its schedule, and its own noise generator."""

    request: GenerationRequest
    schedule: Schedule
    generator: torch.Generator
    latents: torch.Tensor  # (1, C, h, w) fp32, on the backend's device
    cond: Conditioning | None = None
    step: int = 0
    x0: torch.Tensor | None = None  # the last step's predicted clean latents (progressive preview)
    job: Any = None  # the engine's Job this row belongs to
    image: np.ndarray | None = None  # (H, W, 3) uint8 once decoded
    preview_image: np.ndarray | None = None  # the latest step's preview, while streaming

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
    # pinned, non-blocking: admitting a row must not wait for the UNet call already queued on the device
    latents = to_device(torch.randn(shape, generator=generator, dtype=torch.float32), backend.device)
    return Row(request, sampler.schedule(request.steps, shift), generator, latents)


def attach_conditioning(backend: Backend, rows: list[Row]) -> None:
    """Batched text encoding for newly admitted rows (cached per prompt inside the backend)."""
    todo = [r for r in rows if r.cond is None]
    if not todo:
        return
    cond = backend.encode_text([r.request.prompt for r in todo], [r.size_key for r in todo])
    for i, r in enumerate(todo):
        r.cond = cond.row(i)


def step_noise(rows: list[Row], next_levels: list[int], device: torch.device) -> torch.Tensor | None:
    """Fresh noise for the rows that re-noise, each drawn from its own CPU generator (one draw per re-noise,
    the reference order), copied to the device in one transfer; finishing rows get zeros and draw nothing."""
    if all(lvl < 0 for lvl in next_levels):
        return None
    noise = torch.cat([torch.randn(r.latents.shape, generator=r.generator, dtype=torch.float32) if lvl >= 0
                       else torch.zeros(r.latents.shape) for r, lvl in zip(rows, next_levels)])
    return to_device(noise, device)


def step_rows(backend: Backend, sampler: LCMSampler, rows: list[Row], pad_to: int | None = None) -> torch.Tensor:
    """Advance every row by one step with ONE UNet call; returns the rows' predicted x0, (B, C, h, w). All rows
    must share a latent size.

    `pad_to` repeats the last row to a declared batch bucket (GPU backends replay one graph per bucket);
    padded outputs are dropped, so padding never changes a row's result beyond kernel-level float noise.
    """
    assert rows and all(r.size_key == rows[0].size_key for r in rows), "rows in one call must share a size"
    attach_conditioning(backend, rows)
    latents = torch.cat([r.latents for r in rows])  # (B, C, h, w) on the backend's device
    timesteps = [r.schedule.model_timesteps[r.step] for r in rows]
    cond = Conditioning.cat([r.cond for r in rows])  # type: ignore[misc]
    n = len(rows)
    if pad_to is not None and pad_to > n:
        extra = pad_to - n
        latents = torch.cat([latents, latents[-1:].expand(extra, -1, -1, -1)])
        timesteps = timesteps + [timesteps[-1]] * extra
        cond = Conditioning.cat([cond] + [cond.row(n - 1)] * extra)
    eps = backend.unet(latents, timesteps, cond)[:n].to(latents.device)
    next_levels = [r.schedule.next_level(r.step) for r in rows]
    noise = step_noise(rows, next_levels, latents.device)
    x0, x_next = backend.sampler_step(sampler, latents[:n], eps, timesteps[:n], next_levels, noise)
    for i, row in enumerate(rows):
        row.x0 = x0[i : i + 1]
        row.latents = x_next[i : i + 1]
        row.step += 1
    return x0


def decode_rows(backend: Backend, rows: list[Row], preview: bool = False) -> list[np.ndarray]:
    """One batched decode per (image size, decoder) group, in row order: the final latents with each request's
    decoder, or (`preview`) the last predicted x0 with the preview decoder."""
    out: dict[int, np.ndarray] = {}
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.size_key, "preview" if preview else r.request.decoder), []).append(i)
    for (_, decoder), idx in groups.items():
        if preview:
            images = backend.preview(torch.cat([rows[i].x0 for i in idx]))
        else:
            images = backend.decode_with(torch.cat([rows[i].latents for i in idx]), decoder)
        out.update(zip(idx, images))
    return [out[i] for i in range(len(rows))]


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
            for r, img in zip(chunk, decode_rows(backend, chunk)):
                r.image = img
    return [r.image for r in rows]
