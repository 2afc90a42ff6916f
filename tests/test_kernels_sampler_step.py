"""The all-rows LCM step kernel equals LCMSampler.denoise + renoise bit for bit; the uint8 postprocess
kernel equals the torch backend's to_uint8 bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.postprocess import to_uint8, to_uint8_ref
from kernels.sampler_step import lcm_step, lcm_step_ref, step_coefficients
from nitrofusion.backends.torch_backend import to_uint8 as backend_to_uint8
from nitrofusion.sampler import LCMSampler, make_schedule
from nitrofusion.tiny import tiny_scheduler

from .kernel_utils import DEVICE, needs_kernels

pytestmark = needs_kernels


def _sampler(prediction_type: str) -> LCMSampler:
    s = LCMSampler.from_scheduler_config(dict(tiny_scheduler().config))
    s.prediction_type = prediction_type
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (1, 4, 16, 16)])
def test_step_is_bit_exact(prediction_type, shape):
    sampler = _sampler(prediction_type)
    # Rows at different steps of different schedules, as in one engine iteration; some rows finish here.
    scheds = [make_schedule(s, shift) for s, shift in [(4, 250), (1, 500), (2, 250), (3, 1000)]]
    rows = [(sc, i % sc.steps) for i, sc in enumerate(scheds)][: shape[0]]
    timesteps = [sc.model_timesteps[k] for sc, k in rows]
    levels = [sc.next_level(k) for sc, k in rows]
    g = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(shape, generator=g) for _ in range(3))
    den, nxt = lcm_step(sampler, x.to(DEVICE), eps.to(DEVICE), timesteps, levels, z.to(DEVICE))
    ref_den, ref_nxt = lcm_step_ref(sampler, x, eps, timesteps, levels, z)
    assert torch.equal(den.cpu(), ref_den) and torch.equal(nxt.cpu(), ref_nxt)
    # The reference path is the sampler's own code.
    torch.testing.assert_close(ref_den, sampler.denoise(x, eps, timesteps), rtol=0, atol=0)


def test_step_without_renoise_needs_no_noise_and_precomputed_coefficients():
    sampler = _sampler("epsilon")
    x, eps = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    coef = step_coefficients(sampler, [249, 62], [-1, -1], DEVICE)
    den, nxt = lcm_step(sampler, x.to(DEVICE), eps.to(DEVICE), [249, 62], [-1, -1], coefficients=coef)
    assert torch.equal(den, nxt)
    assert torch.equal(den.cpu(), sampler.denoise(x, eps, [249, 62]))


def test_step_rejects_bad_input():
    sampler = _sampler("epsilon")
    x = torch.randn(2, 4, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="noise"):
        lcm_step(sampler, x, x, [249, 62], [749, -1])
    with pytest.raises(ValueError, match="one timestep"):
        lcm_step(sampler, x, x, [249], [-1])
    with pytest.raises(TypeError, match="float32"):
        lcm_step(sampler, x.half(), x.half(), [249, 62], [-1, -1])


def _images(dtype, layout):
    g = torch.Generator().manual_seed(0)
    im = torch.randn(2, 3, 7, 9, generator=g) * 1.3
    # Exact ties and the ends of the range: x with (x * 0.5 + 0.5) * 255 = k + 0.5, and +-1, out of range.
    ties = (torch.arange(0, 7, dtype=torch.float32) + 0.5) / 255 * 2 - 1
    im[0, 0, 0, :7] = ties
    im[0, 1, 0, :4] = torch.tensor([-1.0, 1.0, -7.0, 7.0])
    im = im.to(DEVICE, dtype)
    return im.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else im


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_postprocess_is_bit_exact(dtype, layout):
    im = _images(dtype, layout)
    out = to_uint8(im)
    assert out.dtype == torch.uint8 and out.shape == (2, 7, 9, 3) and out.is_contiguous()
    assert np.array_equal(out.cpu().numpy(), backend_to_uint8(im))


def test_postprocess_every_level_and_its_neighbours():
    """All 256 output levels, their rounding ties and the fp32 values either side of each tie."""
    v = (torch.arange(0, 2 * 256 + 1, dtype=torch.float32) / 2) / 255 * 2 - 1
    v = torch.cat([v, torch.nextafter(v, torch.tensor(9.0)), torch.nextafter(v, torch.tensor(-9.0))])
    im = v[: v.numel() // 3 * 3].view(1, 3, 1, -1).to(DEVICE)
    assert torch.equal(to_uint8(im).cpu(), to_uint8_ref(im.cpu()))
