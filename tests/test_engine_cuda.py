"""The engine on CUDA: rows' latents stay on the device, decodes run on their own stream next to the following
UNet step (NITROFUSION_OVERLAP), the fused sampler-step kernel does the update, and none of it changes an
image: the same seed gives the library's image alone, in a batch, with overlap on or off. Skips without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nitrofusion.engine import Engine, EngineConfig, GenerationFailed, Job
from nitrofusion.generation import GenerationRequest
from nitrofusion.pipeline import load_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the decode stream, the "
                                "fused sampler step on device latents and CUDA graphs run only on a GPU")

REQS = [GenerationRequest(f"prompt {i}", steps=1 + i % 4, seed=100 + i, width=32, height=32) for i in range(10)]


def _run(pipe, overlap: bool, reqs=REQS, stream: bool = False):
    pipe.backend.decode_stream = torch.cuda.Stream(pipe.backend.device) if overlap else None
    engine = Engine(pipe.backend, pipe.sampler, pipe.shift, EngineConfig(max_batch=4, buckets=(1, 2, 4))).start()
    events: list = []
    try:
        jobs = [engine.submit(Job([r], stream=stream, on_progress=events.append)) for r in reqs]
        return [j.future.result(timeout=300)[0] for j in jobs], events
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def cuda_pipe(tiny_sdxl_dir):
    return load_pipeline(tiny_sdxl_dir, device="cuda", backend="torch", buckets=(1, 2, 4))


def test_rows_keep_their_latents_on_the_device(cuda_pipe):
    from nitrofusion.generation import new_row, step_rows

    row = new_row(REQS[3], cuda_pipe.sampler, cuda_pipe.backend, cuda_pipe.shift)
    assert row.latents.is_cuda
    step_rows(cuda_pipe.backend, cuda_pipe.sampler, [row])
    assert row.latents.is_cuda and row.x0.is_cuda


def test_overlap_gives_the_same_images_as_the_library(cuda_pipe):
    ref = [cuda_pipe([r])[0] for r in REQS]
    for overlap in (False, True):
        got, _ = _run(cuda_pipe, overlap)
        for a, b in zip(ref, got):
            d = np.abs(a.astype(np.int16) - b.astype(np.int16))
            assert d.max() <= 1 and (d > 0).mean() < 1e-3, (overlap, d.max(), (d > 0).mean())


def test_streaming_events_arrive_in_order_with_overlap(cuda_pipe):
    reqs = [GenerationRequest("stream me", steps=4, seed=5, width=32, height=32)]
    images, events = _run(cuda_pipe, True, reqs, stream=True)
    assert [(e.step, e.final) for e in events] == [(1, False), (2, False), (3, False), (4, True)]
    assert np.array_equal(events[-1].image, images[0])


def test_a_non_finite_row_fails_alone_with_overlap(cuda_pipe, monkeypatch):
    real = cuda_pipe.backend.unet

    def poisoned(latents, timesteps, cond):
        eps = real(latents, timesteps, cond)
        eps[0] = float("nan")  # the first row of every call
        return eps

    monkeypatch.setattr(cuda_pipe.backend, "unet", poisoned)
    cuda_pipe.backend.decode_stream = torch.cuda.Stream()
    engine = Engine(cuda_pipe.backend, cuda_pipe.sampler, cuda_pipe.shift,
                    EngineConfig(max_batch=1, buckets=(1, 2, 4))).start()
    try:
        job = engine.submit(Job([REQS[0]]))
        with pytest.raises(GenerationFailed, match="non-finite"):
            job.future.result(timeout=300)
    finally:
        engine.stop()
