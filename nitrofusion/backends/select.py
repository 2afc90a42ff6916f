"""Pick and load the backend for `--backend torch|onnxruntime|tensorrt`. Non-torch backends are imported
only when asked for (or picked by default).

Default (no --backend): what an export folder was made for; else onnxruntime on the CPU, where it measured
faster than torch (BENCHMARKS.md), when onnxruntime and onnx import and the dtype is fp32; else torch."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..errors import NitroError
from ..models import LoadedModel

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
    if device is None:
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


def resolve_backend_name(name: str | None, model_dir: str | Path, device: str | None = None,
                         dtype: str | None = None) -> str:
    """The backend to load. name None (auto): the export folder's own backend; else onnxruntime when the device
    is the CPU (--device cpu, or none given and no CUDA), dtype is fp32 (or unset) and onnxruntime imports;
    else torch (CUDA, --dtype bfloat16, no onnxruntime: torch runs it, or gives its own error)."""
    from export.manifest import is_export_dir
    from export.tensorrt_plan import is_engine_dir

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
    if _runs_on_cpu(device) and dtype in ORT_CPU_DTYPES and onnxruntime_available():
        log.info("backend: onnxruntime (the CPU default; --backend torch for torch)")
        return "onnxruntime"
    return "torch"


def load_backend(name: str, model_dir: str | Path, unet_file: str | Path | None, shift: int | None,
                 device: str | None, dtype: str | None) -> tuple[LoadedModel, object]:
    """(model description, backend) for a non-torch backend."""
    if name == "onnxruntime":
        from .onnxruntime_backend import load_onnxruntime_backend

        return load_onnxruntime_backend(model_dir, unet_file, shift, device, dtype)
    if name == "tensorrt":
        from .tensorrt_backend import load_tensorrt_backend

        return load_tensorrt_backend(model_dir, unet_file, shift, device, dtype)
    raise NitroError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
