"""Tiny random-weight SDXL and SD1.x model folders, built once per test session (no downloads)."""

from __future__ import annotations

import os

import torch

# Triton decides when it is imported (and diffusers imports it, through torch._dynamo) whether @triton.jit
# compiles for a GPU or runs in its CPU interpreter. Without CUDA, choose the interpreter here, before
# anything imports diffusers, so tests/test_kernels_*.py can run the kernels. Nothing else in the suite
# launches Triton kernels on the CPU (the torch backend enables them only on CUDA), so this is inert there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nitrofusion.pipeline import load_pipeline  # noqa: E402
from nitrofusion.tiny import save_tiny_model  # noqa: E402

FAMILIES = ["sdxl", "sd"]


@pytest.fixture(scope="session", autouse=True)
def nitro_cache_dir(tmp_path_factory):
    """NITRO_CACHE_DIR for the whole session, set before any other fixture: the ONNX exports that the CPU
    default backend (onnxruntime) makes on first use go here, never to ~/.cache. Processes started by
    tests/helpers.py inherit it, so a server or CLI run reuses what an earlier test exported."""
    path = tmp_path_factory.mktemp("nitro-cache")
    old = os.environ.get("NITRO_CACHE_DIR")
    os.environ["NITRO_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("NITRO_CACHE_DIR", None)
    else:
        os.environ["NITRO_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {fam: save_tiny_model(root / fam, fam, seed=0) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tiny_dirs):
    return tiny_dirs["sdxl"]


@pytest.fixture(scope="session")
def tiny_sd_dir(tiny_dirs):
    return tiny_dirs["sd"]


@pytest.fixture(scope="session")
def pipelines(tiny_dirs):
    """One loaded CPU torch pipeline per family (the reference the other backends are compared with), shared by
    tests that only read from it."""
    return {fam: load_pipeline(path, device="cpu", backend="torch") for fam, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def onnx_exports(tiny_dirs, tmp_path_factory):
    """ONNX exports of the tiny models (SDXL fp32 + fp16, SD fp32), made once: tests/test_export_*.py and
    tests/test_onnxruntime_backend.py."""
    from export.onnx_export import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    precisions = {"sdxl": ("fp32", "fp16"), "sd": ("fp32",)}
    for fam, path in tiny_dirs.items():
        export_onnx(path, root / fam, precisions=precisions[fam], progress=False)
    return {fam: root / fam for fam in tiny_dirs}


@pytest.fixture(scope="session")
def ort_pipelines(onnx_exports):
    """An ONNX Runtime (CPU) pipeline per family, loaded from the export folders (backend auto-detected)."""
    return {fam: load_pipeline(path, device="cpu") for fam, path in onnx_exports.items()}


@pytest.fixture(scope="session")
def auto_pipelines(tiny_dirs, nitro_cache_dir):
    """The CPU default per family: no backend given on a diffusers folder, so onnxruntime, exported on first
    use into the session's NITRO_CACHE_DIR (fp32)."""
    from export.builder import ExportBuilder

    return {fam: load_pipeline(path, device="cpu", builder=ExportBuilder()) for fam, path in tiny_dirs.items()}
