"""CUDA-graph bookkeeping (bucket choice, static buffers, padding, output slicing, fallback) with a fake
graph on the CPU; real capture and replay only on a GPU (skipped here, with the reason printed by -ra)."""

from __future__ import annotations

import pytest
import torch

from kernels.cuda_graphs import GraphCache, StaticBuffers, _as_tuple, graph_key

from .kernel_utils import needs_cuda


class FakeCapturer:
    """Stands in for CUDA graph capture: replay re-runs fn on the static buffers into static outputs."""

    device_type = None

    def __init__(self, fail: bool = False):
        self.fail, self.captures = fail, 0

    def __call__(self, fn, buffers):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        static = tuple(o.clone() for o in _as_tuple(fn(*buffers.tensors)))

        def replay():
            for s, o in zip(static, _as_tuple(fn(*buffers.tensors))):
                s.copy_(o)

        return static, replay


def _fn(x, y):
    return x * 2 + y.sum(dim=1, keepdim=True)[:, :, None] * 0 + x.shape[0]  # depends on the padded batch size


def test_static_buffers_pad_with_the_last_row():
    x = torch.arange(6.0).view(3, 2)
    buf = StaticBuffers(4, [x])
    assert buf.load([x]) == 3
    assert torch.equal(buf.tensors[0], torch.tensor([[0.0, 1], [2, 3], [4, 5], [4, 5]]))
    with pytest.raises(ValueError):
        buf.load([torch.zeros(5, 2)])


def test_graph_keys_separate_shapes_and_dtypes():
    a = graph_key(4, [torch.zeros(3, 2, 2)])
    assert a == graph_key(4, [torch.zeros(1, 2, 2)])
    assert a != graph_key(4, [torch.zeros(3, 2, 3)]) and a != graph_key(4, [torch.zeros(3, 2, 2).double()])
    assert a != graph_key(8, [torch.zeros(3, 2, 2)])


def test_replay_matches_eager_per_bucket():
    cap = FakeCapturer()
    cache = GraphCache(lambda x, y: x * 3 + y, buckets=(1, 2, 4), capturer=cap)
    for n in (1, 3, 2, 4, 3):
        x, y = torch.randn(n, 5), torch.randn(n, 5)
        out = cache(x, y)
        assert out.shape == (n, 5) and torch.equal(out, x * 3 + y)
    assert cap.captures == 3, "one capture per bucket: 1, 4, 2"
    assert cache.summary() == {"graphs": 3, "failed": 0, "eager_calls": 0, "replays": 5}


def test_outputs_are_not_overwritten_by_the_next_replay():
    cache = GraphCache(lambda x: (x + 1, x - 1), buckets=(2,), capturer=FakeCapturer())
    first = cache(torch.zeros(2, 3))
    cache(torch.ones(2, 3))
    assert torch.equal(first[0], torch.ones(2, 3)) and torch.equal(first[1], -torch.ones(2, 3))


def test_padding_rows_are_sliced_off():
    cache = GraphCache(_fn, buckets=(4,), capturer=FakeCapturer())
    x = torch.ones(3, 2, 2)
    out = cache(x, torch.ones(3, 2))
    assert out.shape == (3, 2, 2) and torch.equal(out, torch.full((3, 2, 2), 6.0))  # ran at batch 4


def test_failed_capture_falls_back_to_eager_once():
    cap = FakeCapturer(fail=True)
    cache = GraphCache(lambda x: x + 1, buckets=(1, 2), capturer=cap)
    for _ in range(3):
        assert torch.equal(cache(torch.zeros(2, 2)), torch.ones(2, 2))
    assert len(cache.failed) == 1 and cache.eager_calls == 3
    assert "not permitted" in next(iter(cache.failed.values()))


def test_oversized_disabled_and_wrong_device_run_eagerly():
    cap = FakeCapturer()
    cache = GraphCache(lambda x: x + 1, buckets=(1, 2), capturer=cap)
    assert torch.equal(cache(torch.zeros(3, 1)), torch.ones(3, 1))
    cache.enabled = False
    cache(torch.zeros(1, 1))
    assert cap.captures == 0 and cache.eager_calls == 2
    real = GraphCache(lambda x: x + 1, buckets=(1, 2))  # the CUDA capturer: CPU tensors run eagerly
    assert torch.equal(real(torch.zeros(1, 1)), torch.ones(1, 1)) and real.eager_calls == 1


@needs_cuda
@torch.inference_mode()
def test_cuda_graph_replay_matches_eager_for_the_tiny_unet():
    from nitrofusion.tiny import tiny_pipeline

    unet = tiny_pipeline("sdxl").unet.eval().cuda().half()

    def call(x, t, enc, te, ids):
        return unet(x, t, encoder_hidden_states=enc, added_cond_kwargs={"text_embeds": te, "time_ids": ids},
                    return_dict=False)[0]

    cache = GraphCache(call, buckets=(1, 2, 4), name="unet")
    for n in (1, 3, 3, 2):
        args = (torch.randn(n, 4, 16, 16, device="cuda", dtype=torch.half),
                torch.full((n,), 249, device="cuda"), torch.randn(n, 77, 64, device="cuda", dtype=torch.half),
                torch.randn(n, 32, device="cuda", dtype=torch.half),
                torch.randn(n, 6, device="cuda", dtype=torch.half))
        torch.testing.assert_close(cache(*args), call(*args), rtol=2e-3, atol=2e-3)
    assert cache.summary()["graphs"] == 3 and cache.summary()["failed"] == 0


@needs_cuda
def test_backend_with_kernels_and_graphs_matches_plain_cuda(tiny_sdxl_dir):
    import numpy as np

    from nitrofusion.backends.torch_backend import TorchBackend
    from nitrofusion.generation import GenerationRequest, generate
    from nitrofusion.models import load_model
    from nitrofusion.sampler import LCMSampler

    reqs = [GenerationRequest("a red cat", steps=s, seed=s, width=32, height=32) for s in (1, 2, 4)]
    images = {}
    for flag in (False, True):
        model = load_model(tiny_sdxl_dir)
        backend = TorchBackend(model, device="cuda", dtype="float16", kernels=flag, cuda_graphs=flag)
        sampler = LCMSampler.from_scheduler_config(model.scheduler_config)
        images[flag] = np.stack(generate(backend, sampler, reqs, model.shift))
        if flag:
            assert backend.accel.unet_graphs.summary()["failed"] == 0
            assert backend.accel.unet_graphs.summary()["replays"] >= 4
    diff = np.abs(images[True].astype(np.int16) - images[False].astype(np.int16))
    assert diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_backend_routes_through_graph_caches(tiny_sdxl_dir):
    """The backend's UNet and decode calls go through the graph caches (a fake capture here) and give the
    plain backend's images: argument order, SDXL conditioning, padding to buckets, postprocess inside."""
    import numpy as np

    from nitrofusion.backends.torch_backend import TorchBackend
    from nitrofusion.generation import GenerationRequest, generate
    from nitrofusion.models import load_model
    from nitrofusion.sampler import LCMSampler

    reqs = [GenerationRequest("a red cat", steps=s, seed=s, width=32, height=32) for s in (1, 2, 2)]
    images = {}
    for graphs in (False, True):
        model = load_model(tiny_sdxl_dir)
        backend = TorchBackend(model, device="cpu", kernels=False, buckets=(1, 2, 4))
        if graphs:
            backend.accel.build_graphs(FakeCapturer())
        images[graphs] = np.stack(generate(backend, LCMSampler.from_scheduler_config(model.scheduler_config), reqs,
                                           model.shift))
    summary = backend.accel.unet_graphs.summary()
    assert summary["graphs"] == 2 and summary["replays"] == 2, summary  # 3 rows (bucket 4), then 2 (bucket 2)
    assert backend.accel.vae_graphs.summary()["replays"] == 1
    assert np.abs(images[True].astype(np.int16) - images[False].astype(np.int16)).max() <= 1


def test_warm_up_captures_every_size_and_bucket(tiny_sdxl_dir):
    from nitrofusion.pipeline import load_pipeline

    pipe = load_pipeline(tiny_sdxl_dir, device="cpu", backend="torch", buckets=(1, 2))
    pipe.backend.accel.build_graphs(FakeCapturer())
    assert pipe.warm_up([(32, 32), (16, 24)]) == 4
    assert pipe.backend.accel.unet_graphs.summary()["graphs"] == 4
    assert pipe.backend.accel.vae_graphs.summary()["graphs"] == 4


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_text_encoders_route_through_graph_caches(family, tiny_sd_dir, tiny_sdxl_dir):
    """Both families' text encoders replay from graph caches (a fake capture here) with the eager embeddings:
    SDXL's penultimate layers and pooled projection survive the tuple outputs, and padded rows are cut off."""
    from nitrofusion.backends.torch_backend import TorchBackend
    from nitrofusion.models import load_model

    folder = tiny_sd_dir if family == "sd" else tiny_sdxl_dir
    prompts = ["a red cat", "two blue birds on a wire", "x"]  # 3 prompts: padded to bucket 4
    plain = TorchBackend(load_model(folder), device="cpu", kernels=False)
    graphed = TorchBackend(load_model(folder), device="cpu", kernels=False, buckets=(1, 2, 4))
    graphed.accel.build_graphs(FakeCapturer())
    want, got = plain._encode_uncached(prompts), graphed._encode_uncached(prompts)
    assert (want[1] is None) == (got[1] is None) == (family == "sd")
    torch.testing.assert_close(got[0], want[0])
    if family == "sdxl":
        torch.testing.assert_close(got[1], want[1])
    caches = graphed.accel.text_graphs
    assert len(caches) == (1 if family == "sd" else 2)
    assert all(c.summary() == {"graphs": 1, "failed": 0, "eager_calls": 0, "replays": 1} for c in caches)
