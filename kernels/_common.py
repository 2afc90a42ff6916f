"""Shared launcher helpers: is Triton there, can a kernel run on this tensor, block-size choices."""

from __future__ import annotations

import functools
import os

import torch

try:  # Triton is optional (e.g. macOS, or a CPU-only install without the kernels requirements)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    """Triton's CPU interpreter: decided by TRITON_INTERPRET when triton (and our kernels) were imported."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_launch(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel can run on these tensors: all on one CUDA device, or on the CPU under the
    interpreter. Autograd is not supported, so tensors that need gradients take the torch reference."""
    if triton is None or not tensors:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        return False
    if dev.type == "cuda":
        return not interpreting()
    return dev.type == "cpu" and interpreting()


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """How many programs keep the device busy: several per SM on CUDA (memory-bound loops need warps in flight
    to hide latency); few on the interpreter (it runs programs one after another)."""
    if device.type == "cuda":
        return 8 * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def launch_options(device: torch.device, exact: bool = False) -> dict:
    """Extra launch kwargs. `exact`: no fused multiply-add contraction, so elementwise arithmetic rounds
    like torch's separate kernels (the sampler step and postprocess promise bit-level agreement)."""
    if device.type == "cuda" and exact:
        return {"enable_fp_fusion": False}
    return {}


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
