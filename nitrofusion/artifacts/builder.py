"""What the loader needs from whoever can build artifacts on first use (export/builder.py is the one)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..sources import ModelSource


class ArtifactBuilder(Protocol):
    def onnx(self, model: ModelSource, unet_file: Path | None, precisions: tuple[str, ...]) -> Path:
        """A verified ONNX export folder of this model (a resolved folder, hub snapshot or single file; and UNet
        file), made once and cached."""

    def tensorrt(self, onnx_dir: Path, engine_dir: Path | None, buckets: tuple[int, ...],
                 sizes: list[tuple[int, int]] | None = None, precision: str = "fp16") -> Path:
        """TensorRT engines for an ONNX export, one static profile per (bucket, size); the engine folder."""
