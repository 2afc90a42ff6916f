"""Build on first use: the artifacts the runtime's loader (nitrofusion/backends/select.py) asks for when it is
given a plain diffusers folder and a backend that runs exported graphs. The CLI and the server hand an
`ExportBuilder` to `load_pipeline`; the core package never imports export/ itself."""

from __future__ import annotations

from pathlib import Path

from nitrofusion.sources import ModelSource

from .cache import cache_root, ensure_onnx_export
from .tensorrt_build import build_engines


class ExportBuilder:
    """nitrofusion.artifacts.builder.ArtifactBuilder, backed by the export cache (export/cache.py)."""

    def onnx(self, model: ModelSource, unet_file: Path | None, precisions: tuple[str, ...]) -> Path:
        return ensure_onnx_export(model, unet_file, precisions=precisions)

    def tensorrt(self, onnx_dir: Path, engine_dir: Path | None, buckets: tuple[int, ...],
                 sizes: list[tuple[int, int]] | None = None, precision: str = "fp16") -> Path:
        """Engines for `onnx_dir` (stale or foreign ones rebuilt, valid ones reused); into the cache when
        `engine_dir` is None. Returns the engine folder."""
        engine_dir = engine_dir or cache_root() / "tensorrt" / onnx_dir.name
        build_engines(onnx_dir, engine_dir, list(buckets), sizes, precision)
        return engine_dir
