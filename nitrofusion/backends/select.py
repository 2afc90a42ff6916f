"""The one loader: pick the backend for `--backend torch|onnxruntime|tensorrt`, make sure the artifacts it runs
exist (building them on first use through the caller's builder), and construct it. Backends themselves only
run what they are given; non-torch backends are imported only when picked.

Default (no --backend): what an export folder was made for; else onnxruntime on the CPU, where it measured
faster than torch (BENCHMARKS.md), when onnxruntime and onnx import, the dtype is fp32 and a builder can
export the folder; else torch."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from ..artifacts.builder import ArtifactBuilder
from ..artifacts.engines import EngineManifest, is_engine_dir, require_tensorrt
from ..artifacts.exported import load_exported_model
from ..artifacts.manifest import is_export_dir
from ..errors import ExportVerificationError, NitroError
from ..models import LoadedModel, load_model
from ..sources import ModelSource, resolve_model, resolve_unet
from .base import Backend

BACKENDS = ("torch", "onnxruntime", "tensorrt")
ORT_CPU_DTYPES = (None, "", "float32", "fp32")  # what the ORT backend runs on the CPU (fp32 graphs only)

log = logging.getLogger(__name__)


@functools.cache
def onnxruntime_available() -> bool:
    """onnxruntime and onnx (the exporter a diffusers folder goes through first) both import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _runs_on_cpu(device: str | None) -> bool:
    return not torch.cuda.is_available() if device is None else device == "cpu"


def resolve_backend_name(name: str | None, model_dir: str | Path, device: str | None = None,
                         dtype: str | None = None, can_build: bool = True) -> str:
    """The backend to load. name None (auto): the export folder's own backend; else onnxruntime when the device
    is the CPU (--device cpu, or none given and no CUDA), dtype is fp32 (or unset), onnxruntime imports and the
    folder can be exported (`can_build`); else torch (CUDA, --dtype bfloat16, no onnxruntime or no builder)."""
    if name is not None and name not in BACKENDS:
        raise NitroError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
    if is_engine_dir(model_dir):
        if name not in (None, "tensorrt"):
            raise NitroError(f"{model_dir} holds TensorRT engines (made by `nitrofusion export --format tensorrt`): "
                             "use --backend tensorrt, or pass the original diffusers folder")
        return "tensorrt"
    if is_export_dir(model_dir):
        if name == "torch":
            raise NitroError(f"{model_dir} is an ONNX export (no torch weights): use --backend onnxruntime, or "
                             "pass the original diffusers folder for --backend torch")
        return name or "onnxruntime"
    if name is not None:
        return name
    if can_build and _runs_on_cpu(device) and dtype in ORT_CPU_DTYPES and onnxruntime_available():
        log.info("backend: onnxruntime (the CPU default; --backend torch for torch)")
        return "onnxruntime"
    return "torch"


def _needs_builder(builder: ArtifactBuilder | None, source: ModelSource, name: str) -> ArtifactBuilder:
    if builder is None:
        raise NitroError(f"--backend {name} runs exported graphs and {source.given} is not an export: export it "
                         f"first (nitrofusion export --model {source.given} --format onnx --out DIR) and pass the "
                         "export")
    return builder


def _onnx_dir(source: ModelSource, unet_file, builder: ArtifactBuilder | None, name: str,
              precisions: tuple[str, ...]) -> Path:
    """The ONNX export to run: the folder itself when it is one, else the builder's cached export."""
    if is_export_dir(source.path):
        if unet_file is not None:
            raise NitroError("--unet cannot be swapped into an export folder: export the diffusers folder with the "
                             "UNet swapped in instead (nitrofusion export --model DIR --unet FILE ...)")
        return source.path
    return _needs_builder(builder, source, name).onnx(source, unet_file, precisions)


def load_onnxruntime(source: ModelSource, unet_file, shift, device, dtype,
                     builder: ArtifactBuilder | None) -> tuple[LoadedModel, Backend]:
    from .onnxruntime_backend import OnnxRuntimeBackend

    wants_fp16 = device == "cuda" or (device is None and torch.cuda.is_available()) or dtype in ("float16", "fp16")
    root = _onnx_dir(source, unet_file, builder, "onnxruntime", ("fp32", "fp16") if wants_fp16 else ("fp32",))
    model, _ = load_exported_model(root, shift=shift)
    return model, OnnxRuntimeBackend(model, root, device=device, dtype=dtype)


def load_tensorrt(source: ModelSource, unet_file, shift, device, dtype, buckets: tuple[int, ...],
                  builder: ArtifactBuilder | None) -> tuple[LoadedModel, Backend]:
    """An engine folder is checked (stale or foreign engines rebuilt when a builder is given); a diffusers or
    ONNX folder goes through the builder's ONNX export and an engine cache keyed on everything that
    invalidates an engine, with one profile per declared bucket."""
    from .tensorrt_backend import TensorRTBackend

    require_tensorrt()  # before any slow work: a one-line error where TensorRT or the GPU is missing
    if device not in (None, "cuda"):
        raise NitroError("--backend tensorrt runs on CUDA only: drop --device or use --device cuda")
    if dtype not in (None, "float16", "fp16"):
        log.warning("--dtype %s is ignored by --backend tensorrt (engines are built fp16)", dtype)
    model_dir = source.path
    if is_engine_dir(model_dir):
        if unet_file is not None:
            raise NitroError("--unet cannot be swapped into built engines: export the diffusers folder with --unet")
        engines = EngineManifest.read(model_dir)
        onnx_dir = (model_dir / engines.onnx_dir).resolve()
        if builder is not None:  # rebuilds any stale or foreign engine (other TensorRT, GPU, ONNX) in place
            builder.tensorrt(onnx_dir, model_dir, tuple(engines.buckets), [tuple(s) for s in engines.sizes],
                             engines.precision)
        engine_dir = model_dir
    else:
        onnx_dir = _onnx_dir(source, unet_file, builder, "tensorrt", ("fp32",))
        engine_dir = _needs_builder(builder, source, "tensorrt").tensorrt(onnx_dir, None, buckets)
    model, _ = load_exported_model(onnx_dir, shift=shift)
    return model, TensorRTBackend(model, engine_dir)


def load_backend(model_dir: str | Path | ModelSource, unet_file=None, shift: int | None = None,
                 device: str | None = None, dtype: str | None = None, backend: str | None = None,
                 buckets: tuple[int, ...] | None = None, builder: ArtifactBuilder | None = None,
                 config: str | Path | None = None) -> tuple[LoadedModel, Backend]:
    """(model description, backend). `model_dir` is any form nitrofusion/sources.py resolves (a folder, a cached
    hub repo id, a single-file checkpoint; `config` the configs for the last). With backend None (auto) on a
    diffusers folder, an ONNX export that cannot be written (read-only home, full disk) or does not match torch
    falls back to torch, which runs the folder as it is."""
    from ..scheduler import DEFAULT_BUCKETS

    source = resolve_model(model_dir, config)
    exported = is_export_dir(source.path) or is_engine_dir(source.path)
    # An export refuses any --unet (select's own message), so there is nothing to resolve for it.
    unet = resolve_unet(unet_file) if unet_file is not None and not exported else None
    log.info("model %s%s", source.label(), f", UNet {unet.label()}" if unet is not None else "")
    model, runtime = _load(source, unet or unet_file, shift, device, dtype, backend,
                           tuple(buckets or DEFAULT_BUCKETS), builder)
    # What /v1/models and the logs show: the model as given and what it resolved to. An export folder keeps the
    # name of the model it was exported from (its manifest's).
    extras = getattr(model, "extras", None)
    if extras is not None:
        if not exported:
            extras["name"] = source.name
        extras["source"] = dict(source.describe(), **({"unet": unet.describe()} if unet else {}))
    return model, runtime


def _load(source: ModelSource, unet, shift, device, dtype, backend, buckets, builder) -> tuple[LoadedModel, Backend]:
    """`unet`: the resolved --unet (a ModelSource), or as given for an export folder (which refuses it)."""
    from .torch_backend import TorchBackend, resolve_device_dtype

    model_dir, unet_file = source.path, (unet.path if isinstance(unet, ModelSource) else unet)
    name = resolve_backend_name(backend, model_dir, device, dtype, can_build=builder is not None)
    try:
        if name == "onnxruntime":
            return load_onnxruntime(source, unet_file, shift, device, dtype, builder)
        if name == "tensorrt":
            return load_tensorrt(source, unet_file, shift, device, dtype, buckets, builder)
    except (OSError, ExportVerificationError) as e:
        if backend is not None or is_export_dir(model_dir):
            raise
        log.warning("onnxruntime unavailable for %s (%s: %s); using torch (set NITRO_CACHE_DIR to a writable "
                    "folder, or pass --backend torch)", source.name, type(e).__name__, e)
    resolve_device_dtype(device, dtype)  # a bad device or dtype fails before the (slow) model load
    model = load_model(source, unet_file=unet, shift=shift)
    return model, TorchBackend(model, device=device, dtype=dtype, buckets=buckets)
