"""The LCM sampler step for all rows at once: x0 from the model output, boundary scalings, re-noise.

Matches `nitrofusion.sampler.LCMSampler.step` (denoise, then re-noise, or no re-noise after a row's last
step) element for element: the per-row coefficients are computed by the sampler's own code on the host,
and the kernel does the same fp32 operations in the same order without fused multiply-adds.
"""

from __future__ import annotations

import torch

from ._common import can_launch, launch_options, tl, triton

PREDICTION_TYPES = {"epsilon": 0, "v_prediction": 1, "sample": 2}


def step_coefficients(sampler, timesteps: list[int], next_levels: list[int],
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """(6, B) fp32: sqrt(abar_t), sqrt(1 - abar_t), c_skip, c_out at the model timestep, then the re-noise
    scales sqrt(abar_next), sqrt(1 - abar_next); a row with no next level (-1) gets (1, 0): x_next = x0."""
    if len(timesteps) != len(next_levels):
        raise ValueError(f"{len(timesteps)} timesteps but {len(next_levels)} next levels")
    alpha = sampler.alphas_cumprod[torch.tensor(timesteps, dtype=torch.long)]
    beta = 1 - alpha
    c_skip, c_out = sampler.boundary_scalings(timesteps)
    nxt = torch.tensor(next_levels, dtype=torch.long)
    has_next = nxt >= 0
    alpha_n = sampler.alphas_cumprod[nxt.clamp(min=0)]
    a = torch.where(has_next, alpha_n.sqrt(), torch.ones_like(alpha_n))
    b = torch.where(has_next, (1 - alpha_n).sqrt(), torch.zeros_like(alpha_n))
    coef = torch.stack([alpha.sqrt(), beta.sqrt(), c_skip, c_out, a, b])
    if torch.device(device).type == "cuda":  # pinned: the engine launches this right behind the UNet call
        return coef.pin_memory().to(device, non_blocking=True)  # and must not wait for it
    return coef.to(device)


def lcm_step_ref(sampler, sample: torch.Tensor, model_output: torch.Tensor, timesteps: list[int],
                 next_levels: list[int], noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: `LCMSampler.step` (denoise, then re-noise each row to its next level, or x0 after its last)."""
    return sampler.step(sample, model_output, timesteps, next_levels, noise)


if triton is not None:

    @triton.jit
    def _lcm_step(x_ptr, eps_ptr, z_ptr, coef_ptr, den_ptr, nxt_ptr, N, B,
                  PRED: tl.constexpr, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        idx = row.to(tl.int64) * N + offs
        sa = tl.load(coef_ptr + row)  # sqrt(abar_t)
        sb = tl.load(coef_ptr + B + row)  # sqrt(1 - abar_t)
        c_skip = tl.load(coef_ptr + 2 * B + row)
        c_out = tl.load(coef_ptr + 3 * B + row)
        na = tl.load(coef_ptr + 4 * B + row)
        nb = tl.load(coef_ptr + 5 * B + row)
        x = tl.load(x_ptr + idx, mask=mask, other=0.0)
        m = tl.load(eps_ptr + idx, mask=mask, other=0.0)
        # Same operations, same order as LCMSampler.denoise.
        if PRED == 0:
            x0 = tl.math.div_rn(x - sb * m, sa)  # IEEE division, as torch
        elif PRED == 1:
            x0 = sa * x - sb * m
        else:
            x0 = m
        den = c_out * x0 + c_skip * x
        tl.store(den_ptr + idx, den, mask=mask)
        if HAS_NOISE:
            z = tl.load(z_ptr + idx, mask=mask, other=0.0)
            nxt = na * den + nb * z
        else:
            nxt = na * den
        tl.store(nxt_ptr + idx, nxt, mask=mask)


def lcm_step(sampler, sample: torch.Tensor, model_output: torch.Tensor, timesteps: list[int],
             next_levels: list[int], noise: torch.Tensor | None = None,
             coefficients: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoised x0, next latents) for (B, C, h, w) fp32 rows, each at its own timestep / next level.

    `noise` is needed when any row re-noises (its rows for finished rows are ignored). `coefficients`
    (from `step_coefficients`) may be precomputed on the device to keep the call free of host copies.
    """
    if sample.shape != model_output.shape or sample.ndim < 2:
        raise ValueError(f"sample {tuple(sample.shape)} and model_output {tuple(model_output.shape)} must match")
    if sample.dtype != torch.float32 or model_output.dtype != torch.float32:
        raise TypeError("the sampler step runs in fp32 (as the reference): pass float32 sample and model_output")
    B = sample.shape[0]
    if len(timesteps) != B or len(next_levels) != B:
        raise ValueError(f"need one timestep and one next level per row ({B})")
    needs_noise = any(lvl >= 0 for lvl in next_levels)
    if needs_noise and (noise is None or noise.shape != sample.shape or noise.dtype != torch.float32):
        raise ValueError("rows that re-noise need float32 noise shaped like sample")
    if sampler.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {sampler.prediction_type!r}")
    tensors = [sample, model_output] + ([noise] if needs_noise else [])
    if not can_launch(*tensors):
        return lcm_step_ref(sampler, sample, model_output, timesteps, next_levels, noise)
    if coefficients is None:
        coefficients = step_coefficients(sampler, timesteps, next_levels, sample.device)
    if coefficients.shape != (6, B) or coefficients.device != sample.device:
        raise ValueError(f"coefficients must be (6, {B}) on {sample.device}")
    x, m = sample.contiguous(), model_output.contiguous()
    z = noise.contiguous() if needs_noise else x
    den, nxt = torch.empty_like(x), torch.empty_like(x)
    n = x[0].numel()
    block = max(16, min(1024 if x.is_cuda else 4096, triton.next_power_of_2(n)))
    _lcm_step[(B, triton.cdiv(n, block))](
        x, m, z, coefficients.contiguous(), den, nxt, n, B, PRED=PREDICTION_TYPES[sampler.prediction_type],
        HAS_NOISE=needs_noise, BLOCK=block, **launch_options(x.device, exact=True))
    return den, nxt
