"""Fused GroupNorm(+residual)(+SiLU) against its torch reference over shapes, dtypes, layouts, residuals."""

from __future__ import annotations

import pytest
import torch

from kernels.groupnorm import group_norm_act, group_norm_act_ref

from .kernel_utils import DEVICE, TOL, needs_kernels

pytestmark = needs_kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _make(shape, dtype, layout, residual, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3 + 2
    w = torch.randn(shape[1], generator=g)
    b = torch.randn(shape[1], generator=g)
    r = None
    if residual == "bias":
        r = torch.randn(shape[:2], generator=g)
    elif residual == "full":
        r = torch.randn(shape, generator=g)
    x, w, b = (t.to(DEVICE, dtype) for t in (x, w, b))
    r = None if r is None else r.to(DEVICE, dtype)
    if layout == "channels_last":
        if x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        else:  # (B, C, L) seen through a transpose of (B, L, C): what diffusers' attention passes
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x, w, b, r


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("residual", [None, "bias", "full"])
@pytest.mark.parametrize("shape,groups", [((2, 8, 5, 7), 4), ((1, 12, 3), 3)])
def test_matches_reference(shape, groups, residual, layout, dtype):
    x, w, b, r = _make(shape, dtype, layout, residual)
    y = group_norm_act(x, w, b, groups, 1e-5, "silu", r)
    ref = group_norm_act_ref(x, w, b, groups, 1e-5, "silu", r)
    assert y.dtype == dtype and y.shape == x.shape
    assert y.stride() == x.stride(), "the output keeps the input's memory format"
    torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("chunks", [1, 2, 5])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_split_statistics_combine(chunks, layout):
    """Groups split over several statistics programs give the same result (Chan's combination)."""
    x, w, b, _ = _make((1, 4, 16, 24), torch.float32, layout, None, seed=1)
    y = group_norm_act(x, w, b, 2, 1e-6, "silu", chunks=chunks)
    torch.testing.assert_close(y, group_norm_act_ref(x, w, b, 2, 1e-6, "silu"), **TOL[torch.float32])


@pytest.mark.parametrize("groups", [1, 8])  # one group of everything; one channel per group
def test_no_activation_no_affine_and_group_extremes(groups):
    x, w, b, _ = _make((2, 8, 4, 4), torch.float16, "nchw", None, seed=2)
    torch.testing.assert_close(group_norm_act(x, None, None, groups, 1e-5, None).float(),
                               group_norm_act_ref(x, None, None, groups, 1e-5, None).float(), **TOL[torch.float16])
    torch.testing.assert_close(group_norm_act(x, w, b, groups, 1e-5, None).float(),
                               group_norm_act_ref(x, w, b, groups, 1e-5, None).float(), **TOL[torch.float16])


def test_statistics_stay_accurate_with_a_large_mean():
    """fp32 Welford statistics: a large offset does not swamp a small variance. E[x^2] - E[x]^2 in fp32 would
    lose the variance entirely here (1e-4 against 1e6: below fp32's resolution) and be off by O(1)."""
    g = torch.Generator().manual_seed(3)
    x = (1000.0 + 0.01 * torch.randn((1, 4, 32, 32), generator=g)).to(DEVICE)
    y = group_norm_act(x, None, None, 2, 1e-6, None, chunks=3)
    ref = torch.nn.functional.group_norm(x.double(), 2, eps=1e-6).float()
    # fp32 rounding of the mean near 1000 (ulp 6e-5) against a std of 0.01 bounds the accuracy at ~1e-2.
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-2)


def test_launcher_rejects_bad_input():
    x = torch.randn(1, 6, 4, 4, device=DEVICE)
    w = torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        group_norm_act(x, w, w, 4)
    with pytest.raises(ValueError, match="act"):
        group_norm_act(x, w, w, 3, act="gelu")
    with pytest.raises(ValueError, match="residual"):
        group_norm_act(x, w, w, 3, residual=torch.randn(1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        group_norm_act(x, w[:5], w[:5], 3)
    with pytest.raises(TypeError, match="float"):
        group_norm_act(x.to(torch.int32), w, w, 3)


def test_autograd_takes_the_reference():
    x = torch.randn(1, 4, 3, 3, device=DEVICE, requires_grad=True)
    y = group_norm_act(x, None, None, 2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- GEGLU (the transformer feed-forward activation), a sibling elementwise kernel -------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 5, 24), (3, 40)])
def test_geglu_matches_reference(shape, dtype):
    from kernels.geglu import geglu, geglu_ref

    p = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 2).to(DEVICE, dtype)
    y = geglu(p)
    assert y.shape == (*shape[:-1], shape[-1] // 2) and y.dtype == dtype
    torch.testing.assert_close(y.float(), geglu_ref(p).float(), **TOL[dtype])
    # and against diffusers' own arithmetic (chunk, gelu, multiply in the input dtype)
    h, g = p.chunk(2, dim=-1)
    torch.testing.assert_close(y.float(), (h * torch.nn.functional.gelu(g)).float(), **TOL[dtype])
