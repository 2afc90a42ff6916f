"""Read an export folder back as a model description: configs, tokenizers, scheduler config, shift.

The ONNX Runtime and TensorRT backends run graphs, not torch modules, so the `LoadedModel` made here holds
config-only stand-ins for the components; what the pipeline and limits read (family, native size, token
limits, shift, latent channels) comes out the same as from the original diffusers folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from ..errors import ModelLoadError
from ..models import SHIFT_KEY, LoadedModel, quiet_libraries
from ..sampler import DEFAULT_SHIFT
from .manifest import Manifest, read_manifest

log = logging.getLogger(__name__)


class ConfigOnly:
    """A component with its config and no weights (`.config.x`, like a diffusers / transformers module)."""

    def __init__(self, config: dict):
        self.config = SimpleNamespace(**config)


def _config(root: Path, sub: str, name: str = "config.json") -> dict:
    path = root / sub / name
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"export folder {root} lacks a readable {sub}/{name} ({e}); export the model again") \
            from None


def load_exported_model(root: str | Path, shift: int | None = None,
                        manifest: Manifest | None = None) -> tuple[LoadedModel, Manifest]:
    from transformers import CLIPTokenizer

    quiet_libraries()
    root = Path(root).expanduser()
    manifest = manifest or read_manifest(root)
    scheduler_config = _config(root, "scheduler", "scheduler_config.json")
    if scheduler_config.get(SHIFT_KEY) is not None:
        resolved = int(scheduler_config[SHIFT_KEY])
        if shift is not None and shift != resolved:
            log.warning("model folder sets %s=%d; ignoring --shift %d", SHIFT_KEY, resolved, shift)
    else:
        resolved = DEFAULT_SHIFT if shift is None else int(shift)
    names = ["", "_2"] if manifest.family == "sdxl" else [""]
    try:
        tokenizers = [CLIPTokenizer.from_pretrained(root / f"tokenizer{s}", local_files_only=True) for s in names]
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizers of export folder {root}: {e}") from None
    model = LoadedModel(
        path=root, family=manifest.family, unet=ConfigOnly(_config(root, "unet")), vae=ConfigOnly(_config(root, "vae")),
        text_encoders=[ConfigOnly(_config(root, f"text_encoder{s}")) for s in names], tokenizers=tokenizers,
        scheduler_config=scheduler_config, shift=resolved,
        preview_vae=ConfigOnly(_config(root, "vae_preview")) if (root / "vae_preview").is_dir() else None,
        extras={"name": manifest.source.get("name") or Path(manifest.source.get("path", root)).name, "export": manifest},
    )
    return model, manifest
