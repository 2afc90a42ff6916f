"""The manifest written beside every export (read here by the runtime; export/ writes it): what was exported from what, by which versions, and how.

A folder holding `nitrofusion_export.json` is an export folder; `load_pipeline` recognises it as `--model`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ModelLoadError

MANIFEST_NAME = "nitrofusion_export.json"
FORMAT = "nitrofusion-onnx"
FORMAT_VERSION = 1


@dataclass
class ComponentEntry:
    """One exported graph: its folder (model.onnx + any external data), file hashes, IO shapes, check result."""

    folder: str  # relative to the export root, e.g. "fp32/unet"
    precision: str  # "fp32" | "fp16" (weights and compute; inputs and outputs stay fp32)
    inputs: dict[str, dict]  # name -> {"shape": [dim or axis name], "dtype": "float32" | "int64"}
    outputs: dict[str, dict]
    files: dict[str, str]  # file name -> sha256
    max_abs_diff: float  # against torch fp32 on the sample inputs, with ONNX Runtime (CPU)
    tolerance: float


@dataclass
class Manifest:
    family: str  # "sdxl" | "sd"
    source: dict  # {"path", "hash", "unet_file", "unet_hash"}
    exporter: dict  # package versions and the exporter used
    opset: int
    precisions: list[str]
    components: dict[str, dict[str, ComponentEntry]]  # precision -> component name -> entry
    latent_channels: int
    vae_scale_factor: int
    native_size: int
    cache_key: str | None = None  # set for entries of the export cache
    created: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extras: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        comps = {p: {n: ComponentEntry(**e) for n, e in cs.items()} for p, cs in data.pop("components").items()}
        return cls(components=comps, **data)

    def write(self, root: Path) -> None:
        """Written last, atomically: an export without a manifest is an unfinished one."""
        tmp = root / (MANIFEST_NAME + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, root / MANIFEST_NAME)


def is_export_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path).expanduser() / MANIFEST_NAME).is_file()


def read_manifest(root: str | Path) -> Manifest:
    path = Path(root).expanduser() / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{root} is not a nitrofusion export folder (no {MANIFEST_NAME})") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"export manifest {path} is not valid JSON ({e}); export the model again") from None
    if data.get("format") != FORMAT or data.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"export folder {root} has format {data.get('format')!r} v{data.get('format_version')}, this version "
            f"reads {FORMAT!r} v{FORMAT_VERSION}: export the model again with `nitrofusion export`"
        )
    try:
        return Manifest.from_dict(data)
    except TypeError as e:
        raise ModelLoadError(f"export manifest {path} is incomplete ({e}); export the model again") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_folder(folder: Path, digest=sha256_file) -> str:
    """Content hash of every file under `folder` (relative paths and bytes), independent of mtimes. `digest`
    hashes one file: export/hash_memo.py's HashMemo.digest skips unchanged files."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        rel = p.relative_to(folder).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # editor / VCS droppings are not model content
        h.update(rel.encode() + b"\0" + digest(p).encode() + b"\n")
    return h.hexdigest()


def check_files(root: Path, manifest: Manifest, digest=sha256_file) -> str | None:
    """None when every listed file is present with its recorded hash, else what is wrong (one line)."""
    for comps in manifest.components.values():
        for name, entry in comps.items():
            for fname, recorded in entry.files.items():
                path = root / entry.folder / fname
                if not path.is_file():
                    return f"{name}: {path} is missing"
                if digest(path) != recorded:
                    return f"{name}: {path} does not match its recorded hash"
    return None
