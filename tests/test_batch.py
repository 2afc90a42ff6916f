"""Rows at different steps share one UNet call, and a request gives the same image alone or in a batch."""

import numpy as np
import pytest
import torch

from nitrofusion.generation import GenerationRequest, new_row, step_rows
from nitrofusion.pipeline import load_pipeline

MIXED = [
    GenerationRequest("a red circle", 1, 11, 64, 48),
    GenerationRequest("a blue square", 2, 22, 64, 48),
    GenerationRequest("a green dog", 3, 33, 64, 48),
    GenerationRequest("a red circle", 4, 44, 64, 48),
    GenerationRequest("the cat", 2, 55, 64, 48),
]


def _assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # Batched float kernels may round one or two pixels the other way: at most 1/255, almost nowhere.
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.max() <= 1
    assert (d > 0).mean() < 1e-3


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_same_image_alone_or_in_any_batch(tiny_dirs, family):
    # torch's batched kernels (ONNX Runtime's batch mixing: tests/test_onnxruntime_backend.py)
    alone_pipe = load_pipeline(tiny_dirs[family], device="cpu", backend="torch")
    batch_pipe = load_pipeline(tiny_dirs[family], device="cpu", backend="torch")  # its own text cache
    alone = [alone_pipe([r])[0] for r in MIXED]
    batched = batch_pipe(MIXED)
    reordered = batch_pipe(MIXED[::-1])[::-1]
    for a, b, c in zip(alone, batched, reordered):
        _assert_same_image(a, b)
        _assert_same_image(a, c)
    # and different seeds really give different images (the check above can fail)
    assert np.abs(alone[0].astype(int) - alone[3].astype(int)).max() > 8


def test_one_unet_call_per_iteration_over_mixed_steps(pipelines, monkeypatch):
    pipe = pipelines["sdxl"]
    calls = []
    real_unet = pipe.backend.unet

    def counting_unet(latents, timesteps, cond):
        calls.append(list(timesteps))
        return real_unet(latents, timesteps, cond)

    monkeypatch.setattr(pipe.backend, "unet", counting_unet)
    pipe(MIXED[:4])  # steps 1, 2, 3, 4
    # 4 iterations; the first has every row at its own first (shifted) timestep
    assert calls == [[249, 249, 249, 249], [124, 187, 187], [124, 124], [62]]


def test_padding_to_a_bucket_does_not_change_rows(pipelines):
    pipe = pipelines["sd"]

    def run(pad_to):
        rows = [new_row(r, pipe.sampler, pipe.backend, pipe.shift) for r in MIXED[:3]]
        while active := [r for r in rows if not r.done]:
            step_rows(pipe.backend, pipe.sampler, active, pad_to=pad_to)
        return torch.cat([r.latents for r in rows])

    torch.testing.assert_close(run(None), run(8), rtol=1e-5, atol=1e-5)


def test_each_step_exposes_predicted_x0(pipelines):
    pipe = pipelines["sdxl"]
    row = new_row(GenerationRequest("a red circle", 3, 7, 64, 48), pipe.sampler, pipe.backend, pipe.shift)
    previews = []
    while not row.done:
        step_rows(pipe.backend, pipe.sampler, [row])
        previews.append(row.x0.clone())
    assert len(previews) == 3
    assert all(p.shape == (1, 4, 24, 32) for p in previews)
    torch.testing.assert_close(previews[-1], row.latents)  # the last x0 is the final image's latents
    assert not torch.allclose(previews[0], previews[1])
