"""Every version that can change what the exporter writes: recorded in each manifest, part of the cache key."""

from __future__ import annotations

from nitrofusion.artifacts.manifest import FORMAT_VERSION

OPSET = 17
EXPORTER = "torch.onnx TorchScript exporter (dynamo=False)"


def exporter_versions() -> dict[str, str]:
    """Every version that can change what the exporter writes; part of the export cache key."""
    from importlib.metadata import version

    import nitrofusion

    out = {"nitrofusion": nitrofusion.__version__, "exporter": EXPORTER, "format_version": str(FORMAT_VERSION)}
    for pkg in ("torch", "onnx", "onnxruntime", "diffusers", "transformers"):
        out[pkg] = version(pkg)
    return out
