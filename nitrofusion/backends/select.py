"""Pick and load the backend for `--backend torch|onnxruntime|tensorrt` (None: torch, or what an export
folder was made for). Non-torch backends are imported only when asked for."""

from __future__ import annotations

from pathlib import Path

from ..errors import NitroError
from ..models import LoadedModel

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def resolve_backend_name(name: str | None, model_dir: str | Path) -> str:
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
    return name or "torch"


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
