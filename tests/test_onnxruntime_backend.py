"""The ONNX Runtime backend is a drop-in for the torch backend: same seeds give the same images (within
2/255, CPU fp32) for both families, 1 and 4 steps, and a batch whose rows are at different steps. It is the
CPU default: no backend on a diffusers folder exports it into the cache and runs it with onnxruntime."""

import numpy as np
import pytest

from export.builder import ExportBuilder
from nitrofusion.backends.base import Backend
from nitrofusion.errors import NitroError
from nitrofusion.generation import GenerationRequest
from nitrofusion.pipeline import load_pipeline

PROMPT = "a photo of a red cat"


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


@pytest.mark.parametrize("source", ["export folder", "cpu default"])
@pytest.mark.parametrize("family", ["sdxl", "sd"])
@pytest.mark.parametrize("steps", [1, 4])
def test_parity_with_torch(request, pipelines, source, family, steps):
    """An export folder (backend from its manifest), and a diffusers folder with no backend on the CPU
    (onnxruntime on an export made on first use in NITRO_CACHE_DIR), against backend="torch"."""
    if source == "export folder":
        pipe = request.getfixturevalue("ort_pipelines")[family]
    else:
        pipe = request.getfixturevalue("auto_pipelines")[family]
        cache = request.getfixturevalue("nitro_cache_dir")
        assert pipe.backend.root.parent == cache / "onnx"  # the session's cache, never ~/.cache
    assert pipe.backend.name == "onnxruntime" and pipelines[family].backend.name == "torch"
    for seed, (w, h) in ((1234, (64, 48)), (7, (32, 32))):  # a non-native, non-square size too
        req = GenerationRequest(PROMPT, steps, seed=seed, width=w, height=h)
        ours = pipe([req])[0]
        ref = pipelines[family]([req])[0]
        assert ours.shape == (h, w, 3)
        assert _max_diff(ours, ref) <= 2


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_batch_mixing_step_counts(pipelines, ort_pipelines, family):
    """Rows at steps 1-4 share every ORT UNet call (one timestep per row) and match torch run alone."""
    reqs = [GenerationRequest(p, s, seed=100 + s, width=48, height=32)
            for s, p in zip((1, 2, 3, 4), ("a red cat", "a blue dog", "a green square", "a cat"))]
    batched = ort_pipelines[family](reqs)
    for req, img in zip(reqs, batched):
        assert _max_diff(img, pipelines[family]([req])[0]) <= 2


def test_parity_check_is_sensitive(pipelines, ort_pipelines):
    """Control: the 2/255 comparison notices another seed."""
    a = ort_pipelines["sd"]([GenerationRequest(PROMPT, 2, seed=1, width=32, height=32)])[0]
    b = pipelines["sd"]([GenerationRequest(PROMPT, 2, seed=2, width=32, height=32)])[0]
    assert _max_diff(a, b) > 8


def test_same_interface_as_torch(pipelines, ort_pipelines):
    ort, torch_pipe = ort_pipelines["sdxl"], pipelines["sdxl"]
    be = ort.backend
    assert (be.latent_channels, be.vae_scale_factor) == (torch_pipe.backend.latent_channels,
                                                         torch_pipe.backend.vae_scale_factor)
    assert ort.tokens.count(PROMPT) == torch_pipe.tokens.count(PROMPT)
    assert isinstance(be, Backend) and isinstance(torch_pipe.backend, Backend)
    assert ort.model.native_size == torch_pipe.model.native_size and ort.shift == torch_pipe.shift
    assert ort.model.max_prompt_tokens == torch_pipe.model.max_prompt_tokens
    cond = be.encode_text([PROMPT, "a dog"], [(64, 48), (32, 32)])
    ref = torch_pipe.backend.encode_text([PROMPT, "a dog"], [(64, 48), (32, 32)])
    for ours, theirs in ((cond.embeds, ref.embeds), (cond.pooled, ref.pooled), (cond.time_ids, ref.time_ids)):
        assert ours.shape == theirs.shape and float((ours - theirs).abs().max()) < 1e-4
    latents = __import__("torch").randn(2, 4, 8, 8)
    assert be.decode(latents).shape == (2, 16, 16, 3) and be.decode(latents).dtype == np.uint8
    assert be.preview(latents).shape == (2, 16, 16, 3)  # no tiny decoder: the full VAE


def test_prompt_embeddings_are_cached(onnx_exports, monkeypatch):
    # A backend of its own: the session's ort_pipelines may already hold these prompts from an earlier test.
    be = load_pipeline(onnx_exports["sd"], device="cpu").backend
    calls = []
    real = be._encode_uncached
    monkeypatch.setattr(be, "_encode_uncached", lambda prompts: calls.append(list(prompts)) or real(prompts))
    be.encode_text(["a blue square", "a red circle"], [(32, 32)] * 2)
    be.encode_text(["a red circle", "a blue square", "a red circle"], [(32, 32)] * 3)
    assert calls == [["a blue square", "a red circle"]]


def test_export_folder_refuses_torch_and_unet(onnx_exports, tmp_path):
    with pytest.raises(NitroError, match="use --backend onnxruntime"):
        load_pipeline(onnx_exports["sd"], backend="torch")
    with pytest.raises(NitroError, match="--unet cannot be swapped"):
        load_pipeline(onnx_exports["sd"], unet_file=tmp_path / "u.safetensors")


def test_default_backend_is_onnxruntime_on_the_cpu_only(tiny_sd_dir, onnx_exports, monkeypatch):
    import torch

    from nitrofusion.backends import select
    from nitrofusion.backends.select import resolve_backend_name

    assert resolve_backend_name(None, tiny_sd_dir, device="cpu") == "onnxruntime"
    assert resolve_backend_name(None, tiny_sd_dir, device="cpu", dtype="float32") == "onnxruntime"
    assert resolve_backend_name(None, tiny_sd_dir, device="cuda") == "torch"
    assert resolve_backend_name("torch", tiny_sd_dir, device="cpu") == "torch"  # asked for: never overridden
    assert resolve_backend_name("onnxruntime", tiny_sd_dir, device="cuda") == "onnxruntime"
    for device in ("cpu", "cuda", None):  # an export folder picks its own backend wherever it runs
        assert resolve_backend_name(None, onnx_exports["sd"], device=device) == "onnxruntime"
    # ORT has fp32 graphs only on the CPU: other dtypes go to torch, which runs bfloat16 or says what is wrong
    assert resolve_backend_name(None, tiny_sd_dir, device="cpu", dtype="bfloat16") == "torch"
    assert resolve_backend_name(None, tiny_sd_dir, device="cpu", dtype="float16") == "torch"
    # no --device: the CPU when there is no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend_name(None, tiny_sd_dir) == "onnxruntime"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_backend_name(None, tiny_sd_dir) == "torch"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # without onnxruntime (or onnx, which the export needs) installed: torch
    assert select.onnxruntime_available() is True  # this environment has both
    monkeypatch.setattr(select, "onnxruntime_available", lambda: False)
    assert resolve_backend_name(None, tiny_sd_dir, device="cpu") == "torch"


def test_default_falls_back_to_torch_for_bfloat16_and_an_unwritable_cache(tiny_sd_dir, tmp_path, monkeypatch,
                                                                          caplog):
    pipe = load_pipeline(tiny_sd_dir, device="cpu", dtype="bfloat16")
    assert pipe.backend.name == "torch"
    with pytest.raises(NitroError, match="float16 is not supported on the CPU"):  # torch's own message
        load_pipeline(tiny_sd_dir, device="cpu", dtype="float16")
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("")
    monkeypatch.setenv("NITRO_CACHE_DIR", str(not_a_folder))
    with caplog.at_level("WARNING"):
        pipe = load_pipeline(tiny_sd_dir, device="cpu", builder=ExportBuilder())
    assert pipe.backend.name == "torch"
    assert any("using torch" in r.getMessage() and "NITRO_CACHE_DIR" in r.getMessage() for r in caplog.records)
    with pytest.raises(OSError):  # asked for by name: no silent switch
        load_pipeline(tiny_sd_dir, device="cpu", backend="onnxruntime", builder=ExportBuilder())


def test_precision_choice():
    from nitrofusion.backends.onnxruntime_backend import resolve_precision

    assert resolve_precision("cpu", None, ["fp32", "fp16"]) == "fp32"
    assert resolve_precision("cuda", None, ["fp32", "fp16"]) == "fp16"
    assert resolve_precision("cuda", None, ["fp32"]) == "fp32"
    with pytest.raises(NitroError, match="not supported on the CPU"):
        resolve_precision("cpu", "float16", ["fp32", "fp16"])
    with pytest.raises(NitroError, match="no fp16 graphs"):
        resolve_precision("cuda", "float16", ["fp32"])


def test_server_on_onnxruntime(onnx_exports, pipelines):
    """`serve --model EXPORT_DIR`: the server's batching engine on ORT sessions, concurrent requests at
    different steps, images matching torch within 2/255."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from nitrofusion.images import decode_image

    from .helpers import ServerProcess

    srv = ServerProcess("--model", onnx_exports["sd"], "--device", "cpu", env={"NITRO_WARMUP": "false"})
    try:
        srv.wait_ready("/readyz")
        card = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert (card["backend"], card["family"]) == ("onnxruntime", "sd")
        bodies = [{"prompt": "a red cat", "steps": s, "seed": 60 + s, "width": 48, "height": 32} for s in (1, 2, 4)]
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda b: httpx.post(srv.url + "/generate", json=b, timeout=120), bodies))
        for body, r in zip(bodies, replies):
            assert r.status_code == 200, r.text
            got = decode_image(base64.b64decode(r.json()["images"][0]))
            ref = pipelines["sd"]([GenerationRequest(body["prompt"], body["steps"], body["seed"], 48, 32)])[0]
            assert _max_diff(got, ref) <= 2
    finally:
        out = srv.stop()
    assert srv.proc.returncode == 0, out
