"""The schedule and the per-row LCM update against diffusers' LCMScheduler and the method's numbers."""

import pytest
import torch

from nitrofusion.sampler import LCMSampler, make_schedule
from nitrofusion.tiny import tiny_scheduler

from .reference import TimestepShiftLCMScheduler

# From the method notes: Realism (S = 250) calls the UNet at these timesteps.
REALISM = {1: (249,), 2: (249, 124), 3: (249, 187, 124), 4: (249, 187, 124, 62)}
LEVELS = {1: (999,), 2: (999, 499), 3: (999, 749, 499), 4: (999, 749, 499, 249)}


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_realism_schedule_matches_method_notes(steps):
    s = make_schedule(steps, 250)
    assert s.levels == LEVELS[steps]
    assert s.model_timesteps == REALISM[steps]
    assert s.next_level(steps - 1) == -1


@pytest.mark.parametrize("shift", [250, 500, 1000, 137])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_schedule_matches_reference_scheduler(steps, shift):
    ref = TimestepShiftLCMScheduler.from_config(tiny_scheduler().config, shifted_timestep=shift)
    ref.config.original_inference_steps = 4
    ref.set_timesteps(steps)
    s = make_schedule(steps, shift)
    assert list(s.model_timesteps) == ref.timesteps.tolist()
    assert list(s.levels) == ref.origin_timesteps.tolist()


@pytest.mark.parametrize("steps", [0, 5, -1])
def test_schedule_rejects_steps_outside_1_to_4(steps):
    with pytest.raises(ValueError, match="steps"):
        make_schedule(steps, 250)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_per_row_update_equals_reference_step(steps):
    """Rows at different steps in one update give what the reference scheduler gives row by row."""
    sampler = LCMSampler.from_scheduler_config(tiny_scheduler().config)
    sched = make_schedule(steps, 250)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(steps, 4, 6, 5, generator=g)
    eps = torch.randn(steps, 4, 6, 5, generator=g)
    # row i is at step i of the same schedule
    denoised = sampler.denoise(x, eps, list(sched.model_timesteps))
    for i in range(steps):
        ref = TimestepShiftLCMScheduler.from_config(tiny_scheduler().config, shifted_timestep=250)
        ref.config.original_inference_steps = 4
        ref.set_timesteps(steps)
        ref._step_index = i
        prev_ref, denoised_ref = ref.step(eps[i : i + 1], ref.timesteps[i], x[i : i + 1],
                                          generator=torch.Generator().manual_seed(42 + i), return_dict=False)
        torch.testing.assert_close(denoised[i : i + 1], denoised_ref, rtol=1e-6, atol=1e-6)
        nxt = sched.next_level(i)
        if nxt >= 0:  # same generator state -> the same noise the reference drew inside step()
            noise = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(42 + i))
            torch.testing.assert_close(sampler.renoise(denoised[i : i + 1], [nxt], noise), prev_ref)
        else:
            torch.testing.assert_close(denoised_ref, prev_ref)
