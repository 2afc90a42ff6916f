"""GEGLU of the transformer feed-forward: (..., 2D) projection -> h * gelu(gate) (..., D) in one pass.

diffusers' GEGLU runs chunk -> gelu (one kernel, one rounding) -> multiply (another); fused, the gate's
GELU (exact erf form, fp32) and the product are computed in registers and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import can_launch, check_float, tl, triton


def geglu_ref(proj: torch.Tensor) -> torch.Tensor:
    """The reference, in fp32, returned in proj's dtype."""
    h, gate = proj.float().chunk(2, dim=-1)
    return (h * F.gelu(gate)).to(proj.dtype)


if triton is not None:

    @triton.jit
    def _geglu(p_ptr, y_ptr, D, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < D
        h = tl.load(p_ptr + row * 2 * D + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(p_ptr + row * 2 * D + D + offs, mask=mask, other=0.0).to(tl.float32)
        y = h * (0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476)))
        tl.store(y_ptr + row * D + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def geglu(proj: torch.Tensor) -> torch.Tensor:
    """(..., 2D) -> (..., D): first half times GELU(second half)."""
    check_float("proj", proj)
    if proj.ndim < 1 or proj.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even (value and gate halves), got shape {tuple(proj.shape)}")
    if not can_launch(proj) or proj.numel() == 0:
        return geglu_ref(proj)
    p = proj.contiguous()
    d = p.shape[-1] // 2
    rows = p.numel() // (2 * d)
    y = torch.empty((*p.shape[:-1], d), dtype=p.dtype, device=p.device)
    block = max(16, min(1024 if p.is_cuda else 4096, triton.next_power_of_2(d)))
    _geglu[(rows, triton.cdiv(d, block))](p, y, d, BLOCK=block)
    return y
