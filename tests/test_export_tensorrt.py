"""TensorRT: the parts that need no TensorRT (engine cache keys, batch-bucket profiles and picking one, the
engine manifest) run everywhere; building and running engines needs TensorRT 10 and a CUDA GPU and skips,
with its reason printed (-ra), where they are missing. The GPU Docker image runs them: see README."""

import json

import pytest

from export.tensorrt_plan import GpuInfo, component_precision, engine_cache_key, engine_problem, parse_sizes
from nitrofusion.artifacts.engines import (
    EngineManifest,
    EngineRecord,
    Profile,
    ShapeOutsideProfiles,
    is_engine_dir,
    plan_profiles,
    select_profile,
)
from nitrofusion.engine import EngineConfig
from nitrofusion.errors import InvalidRequest, NitroError
from nitrofusion.generation import GenerationRequest

GPU = GpuInfo("NVIDIA H100 80GB HBM3", "9.0")
PROFILES = plan_profiles([1, 2, 4, 8], [(1024, 1024), (832, 1216)], 8)


def test_cache_key_changes_with_each_invalidating_input():
    base = {"onnx_sha256": "a" * 64, "trt_version": "10.13.0", "gpu": GPU, "precision": "fp16", "profiles": PROFILES}
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**base | {"profiles": list(reversed(PROFILES))})  # order is not a change
    changes = {
        "onnx hash": {"onnx_sha256": "b" * 64},
        "TensorRT version": {"trt_version": "10.14.1"},
        "GPU name": {"gpu": GpuInfo("NVIDIA L40S", "9.0")},
        "compute capability": {"gpu": GpuInfo(GPU.name, "8.9")},
        "precision flags": {"precision": "bf16"},
        "profile shapes": {"profiles": PROFILES[:-1]},
        "one profile's batch": {"profiles": [Profile(16, 128, 128)] + PROFILES[1:]},
    }
    keys = {name: engine_cache_key(**base | change) for name, change in changes.items()}
    assert all(k != key for k in keys.values()), keys
    assert len(set(keys.values())) == len(keys)
    with pytest.raises(NitroError, match="unsupported TensorRT precision"):
        engine_cache_key(**base | {"precision": "int3"})


def test_one_static_profile_per_bucket_and_size():
    assert len(PROFILES) == 8
    assert Profile(4, 152, 104) in PROFILES  # 832x1216 px -> 104x152 latent, batch 4
    # The engine's declared buckets drive the default profiles (declared once).
    default = plan_profiles(EngineConfig().buckets, [(1024, 1024)], 8)
    assert [p.batch for p in default] == list(EngineConfig().buckets)
    inputs = {"latents": {"shape": ["B", 4, "h", "w"]}, "timesteps": {"shape": ["B"]},
              "embeds": {"shape": ["B", 77, 2048]}}
    assert Profile(2, 128, 96).shapes(inputs) == {"latents": (2, 4, 128, 96), "timesteps": (2,),
                                                   "embeds": (2, 77, 2048)}
    with pytest.raises(NitroError, match="no TensorRT profile fixes"):
        Profile(1, 8, 8).shapes({"x": {"shape": ["B", "T"]}})
    with pytest.raises(InvalidRequest, match="multiple of the VAE factor"):
        plan_profiles([1], [(1000, 1020)], 16)


@pytest.mark.parametrize("rows,expected", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8)])
def test_profile_selection_picks_the_smallest_bucket_that_fits(rows, expected):
    assert select_profile(PROFILES, rows, 128, 128, 8) == Profile(expected, 128, 128)
    assert select_profile(PROFILES, rows, 152, 104, 8) == Profile(expected, 152, 104)


def test_shape_outside_every_profile_is_a_clear_request_error():
    with pytest.raises(ShapeOutsideProfiles) as size_err:
        select_profile(PROFILES, 1, 64, 64, 8)
    assert isinstance(size_err.value, InvalidRequest)  # the server answers 422, never crashes
    assert "512x512 has no TensorRT engine profile" in str(size_err.value)
    assert "832x1216, 1024x1024" in str(size_err.value) and "--sizes" in str(size_err.value)
    with pytest.raises(ShapeOutsideProfiles, match="more than the largest TensorRT profile \\(8\\)") as batch_err:
        select_profile(PROFILES, 9, 128, 128, 8)
    assert batch_err.value.field == "batch"


def test_backend_rejects_request_sizes_before_queueing():
    """Pipeline.validate asks the backend; the TensorRT backend checks the size against its profiles."""
    from nitrofusion.backends.tensorrt_backend import TensorRTBackend

    backend = TensorRTBackend.__new__(TensorRTBackend)  # the check needs no engines
    backend.profiles, backend.vae_scale_factor = PROFILES, 8
    backend.check_request(GenerationRequest("a cat", 1, 0, 832, 1216))
    with pytest.raises(ShapeOutsideProfiles, match="768x768"):
        backend.check_request(GenerationRequest("a cat", 1, 0, 768, 768))


def test_sizes_and_precisions():
    assert parse_sizes("1024x1024, 832x1216") == [(1024, 1024), (832, 1216)]
    for bad in ("1024", "0x8", "axb", ""):
        with pytest.raises(InvalidRequest):
            parse_sizes(bad)
    assert component_precision("vae_decoder", "fp16") == "bf16"  # the SDXL VAE overflows in fp16
    assert component_precision("unet", "fp16") == "fp16"
    assert component_precision("vae_decoder", "fp32") == "fp32"


def test_engine_manifest_and_stale_or_foreign_engines(tmp_path):
    key = engine_cache_key("a" * 64, "10.13.0", GPU, "fp16", PROFILES)
    plan = tmp_path / "unet.plan"
    plan.write_bytes(b"serialized engine")
    from nitrofusion.artifacts.manifest import sha256_file

    record = EngineRecord("unet", "unet.plan", key, {"gpu": GPU.name}, sha256_file(plan))
    EngineManifest({"unet": record}, "onnx", [1, 2, 4, 8], [[1024, 1024]], "fp16").write(tmp_path)
    assert is_engine_dir(tmp_path)
    back = EngineManifest.read(tmp_path)
    assert back.engines["unet"] == record and back.buckets == [1, 2, 4, 8]
    assert engine_problem(tmp_path, back.engines["unet"], key) is None
    other_gpu = engine_cache_key("a" * 64, "10.13.0", GpuInfo("NVIDIA A10", "8.6"), "fp16", PROFILES)
    assert "another ONNX, TensorRT version, GPU" in engine_problem(tmp_path, record, other_gpu)
    assert engine_problem(tmp_path, None, key) == "not built yet"
    plan.write_bytes(b"truncated")
    assert "does not match its recorded hash" in engine_problem(tmp_path, record, key)
    plan.unlink()
    assert "missing" in engine_problem(tmp_path, record, key)
    (tmp_path / "nitrofusion_engines.json").write_text(json.dumps({"engines": {}}))
    with pytest.raises(NitroError, match="build the engines again"):
        EngineManifest.read(tmp_path)


def test_missing_tensorrt_is_one_clear_error():
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message is not reachable")
    from nitrofusion.artifacts.engines import TensorRTUnavailable, require_tensorrt

    with pytest.raises(TensorRTUnavailable, match="TensorRT is not installed here.*GPU Docker image"):
        require_tensorrt()


# -- needs TensorRT 10 and a CUDA GPU (the GPU Docker image) --------------------------------------------------

def _tensorrt_missing() -> str | None:
    import importlib.util

    import torch

    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed (not installable from PyPI here); run in the GPU Docker image: "
                "docker run --gpus all IMAGE make test")
    if not torch.cuda.is_available():
        return "TensorRT tests need a CUDA GPU"
    return None


# skipif, not a skip inside a fixture: the session fixtures these tests take (ONNX exports) are slow to make.
needs_tensorrt = pytest.mark.skipif(_tensorrt_missing() is not None, reason=_tensorrt_missing() or "")


@pytest.fixture(scope="module")
def tiny_engines(onnx_exports, tmp_path_factory):
    from export.tensorrt_build import build_engines

    out = tmp_path_factory.mktemp("engines")
    build_engines(onnx_exports["sd"], out, [1, 2, 4], [(32, 32), (48, 32)], precision="fp32", progress=False)
    return out


@needs_tensorrt
def test_engines_build_once_and_stale_ones_are_rebuilt(tiny_engines, onnx_exports):
    from export.tensorrt_build import build_engines

    manifest = EngineManifest.read(tiny_engines)
    assert set(manifest.engines) == {"text_encoder", "unet", "vae_decoder"}
    assert (tiny_engines / "timing.cache").is_file()
    stamps = {p.name: p.stat().st_mtime_ns for p in tiny_engines.glob("*.plan")}
    build_engines(onnx_exports["sd"], tiny_engines, [1, 2, 4], [(32, 32), (48, 32)], precision="fp32", progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tiny_engines.glob("*.plan")} == stamps  # reused
    data = json.loads((tiny_engines / "nitrofusion_engines.json").read_text())
    data["engines"]["unet"]["key"] = "0" * 64  # as if built by another TensorRT / GPU
    (tiny_engines / "nitrofusion_engines.json").write_text(json.dumps(data))
    build_engines(onnx_exports["sd"], tiny_engines, [1, 2, 4], [(32, 32), (48, 32)], precision="fp32", progress=False)
    assert (tiny_engines / "unet.plan").stat().st_mtime_ns != stamps["unet.plan"]  # rebuilt, never loaded
    assert (tiny_engines / "vae_decoder.plan").stat().st_mtime_ns == stamps["vae_decoder.plan"]


@needs_tensorrt
def test_tensorrt_backend_parity_and_profile_errors(tiny_engines, onnx_exports, pipelines):
    import numpy as np

    from nitrofusion.artifacts.exported import load_exported_model
    from nitrofusion.backends.tensorrt_backend import TensorRTBackend
    from nitrofusion.generation import generate

    model, _ = load_exported_model(onnx_exports["sd"])
    backend = TensorRTBackend(model, tiny_engines)
    ref = pipelines["sd"]
    reqs = [GenerationRequest("a red cat", s, 40 + s, 48, 32) for s in (1, 2, 3, 4)]  # batch 4 = a bucket
    images = generate(backend, ref.sampler, reqs, ref.shift)
    for req, img in zip(reqs, images):
        assert np.abs(img.astype(int) - ref([req])[0].astype(int)).max() <= 2
    with pytest.raises(ShapeOutsideProfiles):
        backend.check_request(GenerationRequest("a cat", 1, 0, 64, 64))
