"""Our sampler + torch backend reproduce the official recipe (diffusers pipeline + the README's
TimestepShiftLCMScheduler, guidance 0) for the same seed: within 1/255 per pixel, CPU fp32."""

import numpy as np
import pytest

from nitrofusion.generation import GenerationRequest

from .reference import reference_image

PROMPT = "a photo of a red cat"


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("family", ["sdxl", "sd"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_matches_diffusers_reference(pipelines, tiny_dirs, family, steps):
    pipe = pipelines[family]
    ours = pipe([GenerationRequest(PROMPT, steps, seed=1234, width=64, height=48)])[0]
    ref = reference_image(tiny_dirs[family], PROMPT, steps, seed=1234, width=64, height=48, shift=250)
    assert ours.shape == (48, 64, 3)
    assert _max_diff(ours, ref) <= 1


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_parity_check_is_sensitive(pipelines, tiny_dirs, family):
    """Control: the comparison above would notice a wrong shift or seed."""
    pipe = pipelines[family]
    ours = pipe([GenerationRequest(PROMPT, 2, seed=1234, width=64, height=48)])[0]
    wrong_shift = reference_image(tiny_dirs[family], PROMPT, 2, seed=1234, width=64, height=48, shift=500)
    wrong_seed = reference_image(tiny_dirs[family], PROMPT, 2, seed=1235, width=64, height=48, shift=250)
    assert _max_diff(ours, wrong_shift) > 8
    assert _max_diff(ours, wrong_seed) > 8
