"""One bucket list, declared once (nitrofusion.scheduler.DEFAULT_BUCKETS) and overridable by the server's
settings, reaches every path that pads or captures per batch size: the engine's padding, the torch backend's
CUDA graphs (a fake capture on the CPU), warm-up, and the TensorRT engine build (a recording builder)."""

from __future__ import annotations

import pytest

from nitrofusion.engine import Engine, Job
from nitrofusion.generation import GenerationRequest
from nitrofusion.pipeline import load_pipeline
from server.settings import ServerSettings

from .test_kernels_cuda_graphs import FakeCapturer

BUCKETS = (1, 3, 6)


@pytest.fixture
def settings():
    s = ServerSettings(buckets="1,3,6", max_batch=6, warmup=False)
    assert s.buckets == BUCKETS and s.engine_config().buckets == BUCKETS
    return s


def test_settings_buckets_reach_padding_graphs_and_warm_up(tiny_sd_dir, settings):
    pipe = load_pipeline(tiny_sd_dir, device="cpu", backend="torch", buckets=settings.buckets)
    accel = pipe.backend.accel
    assert pipe.buckets == BUCKETS and accel.buckets == BUCKETS
    accel.build_graphs(FakeCapturer())  # what the CUDA path does at load, with a capture that runs on the CPU
    assert accel.unet_graphs.buckets == BUCKETS and accel.vae_graphs.buckets == BUCKETS
    assert all(t.buckets == BUCKETS for t in accel.text_graphs)
    assert pipe.warm_up([(32, 32)]) == 3  # one capture per declared bucket
    assert accel.unet_graphs.summary()["graphs"] == 3
    eager_before = accel.unet_graphs.eager_calls
    engine = Engine(pipe.backend, pipe.sampler, pipe.shift, settings.engine_config()).start()
    try:
        jobs = [engine.submit(Job([GenerationRequest(f"p{i}", 1, i, 32, 32)])) for i in range(4)]
        for j in jobs:
            j.future.result(timeout=120)
    finally:
        engine.stop()
    # 4 rows (or fewer, if they arrived apart) were padded to declared buckets and replayed: nothing eager
    assert accel.unet_graphs.eager_calls == eager_before
    assert accel.unet_graphs.summary()["graphs"] == 3


def test_a_pipeline_loaded_for_other_buckets_is_refused(tiny_sd_dir, settings):
    from server.app import create_app

    pipe = load_pipeline(tiny_sd_dir, device="cpu", backend="torch")  # the default buckets
    with pytest.raises(ValueError, match="pass settings.buckets to load_pipeline"):
        create_app(pipe, settings)


def test_settings_buckets_reach_the_tensorrt_build(tiny_sd_dir, tmp_path, settings, monkeypatch):
    from nitrofusion.backends import select, tensorrt_backend

    built = {}

    class RecordingBuilder:
        def onnx(self, model_dir, unet_file, precisions):
            return tmp_path / "onnx"

        def tensorrt(self, onnx_dir, engine_dir, buckets, sizes=None, precision="fp16"):
            built["buckets"] = buckets
            return onnx_dir

    monkeypatch.setattr(select, "require_tensorrt", lambda: None)  # the parts that need TensorRT and a GPU
    monkeypatch.setattr(select, "load_exported_model", lambda root, shift: ("model", None))
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", lambda model, engine_dir: ("trt", engine_dir))
    select.load_backend(tiny_sd_dir, backend="tensorrt", buckets=settings.buckets, builder=RecordingBuilder())
    assert built["buckets"] == BUCKETS
