"""Decoder output (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) in one pass, ready to encode on the host.

Bit-exact with `nitrofusion.backends.torch_backend.to_uint8` (diffusers' postprocess arithmetic) for any
input dtype: upcast to fp32, x * 0.5 + 0.5, clamp to [0, 1], * 255, round half to even, to uint8.
"""

from __future__ import annotations

import torch

from ._common import can_launch, check_float, launch_options, tl, triton

# Adding and subtracting 2^23 rounds an fp32 in [0, 2^23) to the nearest integer, ties to even: the same
# rounding as torch.round, on every backend (no libdevice call, works in the interpreter).
_ROUND_MAGIC = 8388608.0


def to_uint8_ref(image: torch.Tensor) -> torch.Tensor:
    """The reference: the torch backend's to_uint8 without the host copy. Returns (B, H, W, 3) uint8."""
    image = (image.float() * 0.5 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


if triton is not None:

    @triton.jit
    def _to_uint8(x_ptr, y_ptr, C, HW, sb, sc, sp, BLOCK: tl.constexpr, CP2: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # pixel index (h * W + w)
        c = tl.arange(0, CP2)
        mask = (p[:, None] < HW) & (c[None, :] < C)
        v = tl.load(x_ptr + b * sb + c[None, :] * sc + p[:, None] * sp, mask=mask, other=0.0).to(tl.float32)
        v = v * 0.5 + 0.5
        v = tl.minimum(tl.maximum(v, 0.0), 1.0)
        v = v * 255.0
        v = (v + 8388608.0) - 8388608.0
        tl.store(y_ptr + b * HW * C + p[:, None] * C + c[None, :], v.to(tl.uint8), mask=mask)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float -> (B, H, W, C) uint8 on the same device (any memory format in)."""
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    check_float("image", image)
    if not can_launch(image):
        return to_uint8_ref(image)
    B, C, H, W = image.shape
    if image.stride(3) * W != image.stride(2):  # pixels must be one stride apart (NCHW or channels-last)
        image = image.contiguous()
    out = torch.empty((B, H, W, C), dtype=torch.uint8, device=image.device)
    hw = H * W
    block = max(16, min(1024 if image.is_cuda else 4096, triton.next_power_of_2(hw)))
    _to_uint8[(B, triton.cdiv(hw, block))](
        image, out, C, hw, image.stride(0), image.stride(1), image.stride(3), BLOCK=block,
        CP2=triton.next_power_of_2(C), **launch_options(image.device, exact=True))
    return out
