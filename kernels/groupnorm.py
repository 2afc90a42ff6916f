"""GroupNorm fused with SiLU and an optional residual add, NCHW or channels-last, fp32 statistics.

    y = act(group_norm(x + r) * weight + bias)      r: none, (B, C) per-channel bias (the UNet resnet's
                                                      time embedding), or a tensor shaped like x

Two launches. `_gn_stats`: grid (B*G, chunks); each program folds its slice of one group into per-lane
Welford counters, then into (count, mean, M2) for the slice. `_gn_apply`: grid (B*G, tiles); each program
combines its group's slice statistics (Chan et al.'s parallel formula) and normalises one tile. Splitting
a group over many programs keeps all SMs busy at batch 1 (32 groups would fill a quarter of an H100).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import can_launch, check_float, next_pow2, target_programs, tl, triton

ACTS = (None, "silu")
_RES_NONE, _RES_BIAS, _RES_FULL = 0, 1, 2


def group_norm_act_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                       eps: float = 1e-5, act: str | None = "silu",
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference, computed in fp32 and returned in x's dtype and memory format."""
    s = x.float()
    if residual is not None:
        r = residual.float()
        s = s + (r.view(*r.shape, *([1] * (x.ndim - 2))) if r.ndim == 2 else r)
    y = F.group_norm(s, num_groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    if act == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def _is_channels_last(x: torch.Tensor) -> bool:
    """(B, C, *spatial) stored as (B, *spatial, C): channels_last 4-D tensors, and the (B, C, L) view of a
    (B, L, C) tensor that diffusers' attention passes to its group_norm."""
    if x.ndim < 3 or x.shape[1] == 1:
        return False
    perm = (0, *range(2, x.ndim), 1)
    return x.permute(*perm).is_contiguous() and not x.is_contiguous()


if triton is not None:

    @triton.jit
    def _load_group_elems(x_ptr, r_ptr, e, mask, b, g, base, C, HW, CPG,
                          CHANNELS_LAST: tl.constexpr, RESIDUAL: tl.constexpr):
        """x (+ residual) in fp32 for element indices `e` of group g, with their channel and memory index."""
        if CHANNELS_LAST:
            c = g * CPG + e % CPG
            idx = base + (e // CPG) * C + c
        else:
            c = g * CPG + e // HW
            idx = base + g * CPG * HW + e
        v = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 1:
            v += tl.load(r_ptr + b * C + c, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL == 2:
            v += tl.load(r_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        return v, c, idx

    @triton.jit
    def _gn_stats(x_ptr, r_ptr, part_ptr, C, HW, CPG, GROUP_SIZE, CHUNK, NCHUNK, G,
                  CHANNELS_LAST: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        bg = tl.program_id(0)  # b * G + g
        chunk = tl.program_id(1)
        b = (bg // G).to(tl.int64)
        g = bg % G
        base = b * C * HW  # int64: a (8, 256, 1024, 1024) VAE activation has 2^31 elements
        start = chunk * CHUNK
        end = tl.minimum(start + CHUNK, GROUP_SIZE)
        cnt = tl.zeros([BLOCK], dtype=tl.float32)
        mean = tl.zeros([BLOCK], dtype=tl.float32)
        m2 = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(start, end, BLOCK):
            e = off + tl.arange(0, BLOCK)  # element index inside the group
            mask = e < end
            v, _, _ = _load_group_elems(x_ptr, r_ptr, e, mask, b, g, base, C, HW, CPG, CHANNELS_LAST, RESIDUAL)
            # Per-lane Welford update (lanes that see no element keep count 0).
            cnt_new = cnt + mask.to(tl.float32)
            delta = v - mean
            mean = tl.where(mask, mean + delta / tl.maximum(cnt_new, 1.0), mean)
            m2 = tl.where(mask, m2 + delta * (v - mean), m2)
            cnt = cnt_new
        total = tl.sum(cnt, axis=0)
        mu = tl.sum(cnt * mean, axis=0) / tl.maximum(total, 1.0)
        d = mean - mu
        m2_all = tl.sum(m2 + cnt * d * d, axis=0)
        out = part_ptr + (bg * NCHUNK + chunk) * 3
        tl.store(out, total)
        tl.store(out + 1, mu)
        tl.store(out + 2, m2_all)

    @triton.jit
    def _gn_apply(x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, part_ptr, C, HW, CPG, GROUP_SIZE, NCHUNK, G, eps,
                  CHANNELS_LAST: tl.constexpr, RESIDUAL: tl.constexpr, AFFINE: tl.constexpr,
                  SILU: tl.constexpr, NCHUNK_P2: tl.constexpr, BLOCK: tl.constexpr):
        bg = tl.program_id(0)
        tile = tl.program_id(1)
        b = (bg // G).to(tl.int64)
        g = bg % G
        base = b * C * HW
        # 1. This group's mean and 1/std from the slice statistics (Chan's parallel combination).
        k = tl.arange(0, NCHUNK_P2)
        kmask = k < NCHUNK
        pbase = part_ptr + bg * NCHUNK * 3 + k * 3
        n_k = tl.load(pbase, mask=kmask, other=0.0)
        mu_k = tl.load(pbase + 1, mask=kmask, other=0.0)
        m2_k = tl.load(pbase + 2, mask=kmask, other=0.0)
        total = tl.sum(n_k, axis=0)
        mean = tl.sum(n_k * mu_k, axis=0) / total
        d = mu_k - mean
        var = tl.sum(m2_k + n_k * d * d, axis=0) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        # 2. Normalise, affine, activation for one tile of the group.
        e = tile * BLOCK + tl.arange(0, BLOCK)
        mask = e < GROUP_SIZE
        v, c, idx = _load_group_elems(x_ptr, r_ptr, e, mask, b, g, base, C, HW, CPG, CHANNELS_LAST, RESIDUAL)
        y = (v - mean) * rstd
        if AFFINE:
            y = y * tl.load(w_ptr + c, mask=mask, other=1.0).to(tl.float32) \
                + tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)


def _blocks(x: torch.Tensor, group_size: int, groups_total: int) -> tuple[int, int, int]:
    """(BLOCK, CHUNK, NCHUNK): tile width, elements per stats program, stats programs per group."""
    # The interpreter runs programs one after another: few wide ones are fastest there.
    block = max(16, min(1024 if x.is_cuda else 4096, next_pow2(group_size)))
    want = max(1, target_programs(x.device) // max(1, groups_total))  # slices per group to fill the device
    tiles = triton.cdiv(group_size, block)
    nchunk = max(1, min(want, tiles, 256))
    chunk = triton.cdiv(tiles, nchunk) * block
    return block, chunk, triton.cdiv(group_size, chunk)


def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, num_groups: int,
                   eps: float = 1e-5, act: str | None = "silu", residual: torch.Tensor | None = None,
                   chunks: int | None = None) -> torch.Tensor:
    """Fused GroupNorm(+residual)(+SiLU) on (B, C, *spatial); the torch reference where no kernel can run.

    `chunks` forces the number of statistics programs per group (tests use it to exercise the combine).
    """
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    if x.ndim < 2:
        raise ValueError(f"x must be (B, C, *spatial), got shape {tuple(x.shape)}")
    check_float("x", x)
    B, C = x.shape[:2]
    if C % num_groups:
        raise ValueError(f"{C} channels do not split into {num_groups} groups")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias must both be given or both be None")
    if weight is not None and (weight.shape != (C,) or bias.shape != (C,)):
        raise ValueError(f"weight and bias must be ({C},), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    if residual is not None:
        check_float("residual", residual)
        if residual.shape not in ((B, C), x.shape):
            raise ValueError(f"residual must be (B, C) = {(B, C)} or x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    tensors = [x] + ([weight, bias] if weight is not None else []) + ([residual] if residual is not None else [])
    if not can_launch(*tensors) or x.numel() == 0:
        return group_norm_act_ref(x, weight, bias, num_groups, eps, act, residual)

    channels_last = _is_channels_last(x)
    if not channels_last and not x.is_contiguous():
        x = x.contiguous()
    HW = x[0, 0].numel()
    cpg = C // num_groups
    group_size = cpg * HW
    y = torch.empty_like(x)  # keeps x's memory format (strides of a dense tensor)
    if residual is None:
        res_kind, r = _RES_NONE, x
    elif residual.ndim == 2:
        res_kind, r = _RES_BIAS, residual.contiguous()
    else:
        res_kind, r = _RES_FULL, residual if residual.stride() == x.stride() else _like(residual, x)
    block, chunk, nchunk = _blocks(x, group_size, B * num_groups)
    if chunks is not None:
        nchunk = max(1, min(int(chunks), triton.cdiv(group_size, block)))
        chunk = triton.cdiv(triton.cdiv(group_size, block), nchunk) * block
        nchunk = triton.cdiv(group_size, chunk)
    part = torch.empty((B * num_groups, nchunk, 3), device=x.device, dtype=torch.float32)
    warps = 4 if block <= 1024 else 8
    _gn_stats[(B * num_groups, nchunk)](
        x, r, part, C, HW, cpg, group_size, chunk, nchunk, num_groups,
        CHANNELS_LAST=channels_last, RESIDUAL=res_kind, BLOCK=block, num_warps=warps)
    w = weight if weight is not None else x  # dummies: never read when AFFINE is False
    bb = bias if bias is not None else x
    _gn_apply[(B * num_groups, triton.cdiv(group_size, block))](
        x, r, w, bb, y, part, C, HW, cpg, group_size, nchunk, num_groups, float(eps),
        CHANNELS_LAST=channels_last, RESIDUAL=res_kind, AFFINE=weight is not None, SILU=act == "silu",
        NCHUNK_P2=max(2, next_pow2(nchunk)), BLOCK=block, num_warps=warps)
    return y


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """A copy of t with ref's strides (the kernel indexes both with one offset)."""
    out = torch.empty_like(ref, dtype=t.dtype)
    out.copy_(t)
    return out
