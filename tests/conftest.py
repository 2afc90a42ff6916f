"""Tiny random-weight SDXL and SD1.x model folders, built once per test session (no downloads)."""

from __future__ import annotations

import dataclasses
import os
import random

import torch

# Triton decides when it is imported (and diffusers imports it, through torch._dynamo) whether @triton.jit
# compiles for a GPU or runs in its CPU interpreter. Without CUDA, choose the interpreter here, before
# anything imports diffusers, so tests/test_kernels_*.py can run the kernels. Nothing else in the suite
# launches Triton kernels on the CPU (the torch backend enables them only on CUDA), so this is inert there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from nitrofusion.backends.torch_backend import TorchBackend  # noqa: E402
from nitrofusion.pipeline import load_pipeline  # noqa: E402
from nitrofusion.tiny import save_tiny_model  # noqa: E402

FAMILIES = ["sdxl", "sd"]


# -- test order ----------------------------------------------------------------------------------------
# NITRO_TEST_ORDER=shuffle:SEED runs the files in a seeded random order and each file's tests in a seeded random
# order; NITRO_TEST_ORDER=reverse runs the files last to first. Unset: pytest's order. Either proves that no test
# relies on state an earlier one left (a filled text cache, an export in the session cache, an environment
# variable). Each file's tests stay together so that a module-scoped server starts once per file, not per test.
def _order_mode() -> tuple[str, int | None]:
    value = os.environ.get("NITRO_TEST_ORDER", "").strip()
    if not value:
        return "", None
    if value == "reverse":
        return "reverse", None
    kind, _, seed = value.partition(":")
    if kind == "shuffle" and seed.isdigit():
        return "shuffle", int(seed)
    raise pytest.UsageError(f"NITRO_TEST_ORDER={value!r}: use shuffle:SEED (an integer) or reverse")


def pytest_configure(config):
    _order_mode()  # a malformed NITRO_TEST_ORDER stops the run before collection


def pytest_report_header(config):
    mode, seed = _order_mode()
    if mode:
        return f"test order: {mode}" + (f" (seed {seed})" if seed is not None else "") + " from NITRO_TEST_ORDER"
    return None


def pytest_collection_modifyitems(session, config, items):
    mode, seed = _order_mode()
    if not mode:
        return
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    groups = list(files.values())
    if mode == "reverse":
        groups.reverse()
    else:
        rng = random.Random(seed)
        rng.shuffle(groups)
        for group in groups:
            rng.shuffle(group)
    items[:] = [item for group in groups for item in group]


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


_DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_stay_the_default():
    """The number of intra-op threads changes how CPU kernels split their sums (an image made with 1 thread differs
    from one made with 2 by 1/255 here), and a process started by a test (tests/helpers.py) uses torch's default.
    A test that sets another count (the trainer's `run.threads`) must not change what the tests after it compute."""
    yield
    if torch.get_num_threads() != _DEFAULT_THREADS:
        torch.set_num_threads(_DEFAULT_THREADS)


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
def _loaded_torch_pipelines(tiny_dirs):
    return {fam: load_pipeline(path, device="cpu", backend="torch") for fam, path in tiny_dirs.items()}


@pytest.fixture
def pipelines(_loaded_torch_pipelines):
    """A CPU torch pipeline per family (the reference the other backends are compared with): the models are loaded
    once per session, the backend is new for each test. A backend caches each prompt's text embedding as the batch
    that first encoded it computed it, and a batched matmul rounds differently from a single row (SDXL's pooled
    projection differs in the last bit between a batch of 3 prompts and 1, enough to move a pixel by 1/255), so a
    backend shared across tests would make this reference depend on what earlier tests asked of it. A test may also
    patch its backend (e.g. count UNet calls) without reaching the next test."""
    return {fam: dataclasses.replace(p, backend=TorchBackend(p.model, device="cpu"))
            for fam, p in _loaded_torch_pipelines.items()}


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
