"""Host-to-device copies that do not wait for the GPU.

A copy from ordinary (pageable) host memory synchronises with the work already queued on the stream, so each
small tensor the engine sends per step (timesteps, noise, sampler coefficients, time ids, token ids) would make
the engine thread wait for the previous UNet call, and no decode or text encoding could overlap with it
(measured: 1.00x from a separate decode stream, BENCHMARKS.md, 2026-11-30). Staged through pinned memory, the
copy is queued like a kernel and the thread moves on."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`t` on `device` (and `dtype`): through pinned memory without blocking when a CPU tensor goes to CUDA."""
    device = torch.device(device)
    if dtype is not None and t.dtype != dtype and t.device.type == "cpu":
        t = t.to(dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device, dtype) if dtype is not None else t.to(device)
