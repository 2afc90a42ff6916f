"""The export cache behind `--backend onnxruntime` on a plain diffusers folder.

An entry is keyed on the model's content (every file's bytes), the swapped-in UNet file's bytes, the
precisions and every version that changes what the exporter writes. An entry is used only when its manifest
records that key and every graph file still has its recorded hash; anything else is rebuilt in a fresh
folder and swapped in, so a crash mid-export never leaves a half entry that looks whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from nitrofusion.artifacts.manifest import MANIFEST_NAME, check_files, read_manifest, sha256_file
from nitrofusion.errors import ModelLoadError
from nitrofusion.sources import ModelSource, resolve_model, resolve_unet

from .hash_memo import HashMemo
from .versions import exporter_versions

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """$NITRO_CACHE_DIR, else $XDG_CACHE_HOME/nitrofusion, else ~/.cache/nitrofusion."""
    if env := os.environ.get("NITRO_CACHE_DIR"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nitrofusion"


def onnx_cache_key(source_hash: str, unet_hash: str | None, precisions: tuple[str, ...],
                   versions: dict[str, str] | None = None) -> str:
    payload = {"source": source_hash, "unet": unet_hash, "precisions": sorted(precisions),
               "versions": versions or exporter_versions()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _entry_problem(entry: Path, key: str, memo: HashMemo | None = None) -> str | None:
    """None when `entry` is a complete export made for `key`, else why it cannot be used."""
    if not (entry / MANIFEST_NAME).is_file():
        return "no manifest (unfinished export)"
    try:
        manifest = read_manifest(entry)
    except ModelLoadError as e:
        return str(e)
    if manifest.cache_key != key:
        return "made for another model, UNet file or exporter version"
    return check_files(entry, manifest, memo.digest if memo else sha256_file)


def ensure_onnx_export(model: str | Path | ModelSource, unet_file: str | Path | ModelSource | None = None,
                       precisions: tuple[str, ...] = ("fp32",), progress: bool = True) -> Path:
    """The cache folder holding a verified export of this model, exporting it first when needed. `model`: any
    form nitrofusion/sources.py resolves. The key is the content alone (a folder reached as a path or as a hub
    id shares one entry); the manifest records the name the model was given, its path and revision."""
    from .onnx_export import export_onnx

    source = resolve_model(model)
    memo = HashMemo(cache_root() / "file-hashes.json")  # unchanged files are not re-read on every start
    source_hash = source.content_hash(memo.digest)
    unet_hash = None
    if unet_file is not None:
        unet_file = resolve_unet(unet_file)
        unet_hash = memo.digest(unet_file.path)
    key = onnx_cache_key(source_hash, unet_hash, precisions)
    root = cache_root() / "onnx"
    entry = root / key[:32]
    problem = _entry_problem(entry, key, memo) if entry.exists() else "not cached yet"
    if problem is None:
        memo.save()
        log.info("using cached ONNX export %s", entry)
        return entry
    # Shown by the CLI (warnings) and the server: explains a slow first start, once per model and UNet file.
    log.warning("exporting %s to ONNX for onnxruntime, once (%s; later loads reuse it; --backend torch needs "
                "no export); cache: %s", source.label(), problem, entry)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=root))
    try:
        export_onnx(source, tmp / "export", unet_file=unet_file, precisions=precisions, progress=progress,
                    cache_key=key, source_hash=source_hash)
        if entry.exists():
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=root))
            try:
                os.replace(entry, stale / "old")
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp / "export", entry)
        except OSError:
            # Another process finished the same export first: use theirs if it checks out.
            if _entry_problem(entry, key) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    memo.save()
    return entry
