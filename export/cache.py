"""The export cache behind `--backend onnxruntime` on a plain diffusers folder.

An entry is keyed on the model's content (every file's bytes), the swapped-in UNet file's bytes, the
precisions and every version that changes what the exporter writes. An entry is used only when its manifest
records that key and every graph file still has its recorded hash; anything else is rebuilt in a fresh
folder and swapped in, so a crash mid-export never leaves a half entry that looks whole. The fresh folder of
an export that was killed is removed by the next export's start (sweep_stale).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: unfinished folders are swept by age alone
    fcntl = None

from nitrofusion.artifacts.manifest import MANIFEST_NAME, check_files, read_manifest, sha256_file
from nitrofusion.errors import ModelLoadError
from nitrofusion.sources import ModelSource, resolve_model, resolve_unet

from .hash_memo import HashMemo
from .versions import exporter_versions

log = logging.getLogger(__name__)

OWNER_LOCK = ".owner.lock"
UNLOCKED_MAX_AGE_S = 24 * 3600  # a work folder with no lock (made by an older version) is left this long


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


def _claim(folder: Path) -> int | None:
    """Hold an exclusive lock on folder/.owner.lock while this process works in `folder`. The OS releases it
    when the process ends, however it ends, which is how sweep_stale tells a dead owner from a live one
    (also across processes that share the cache, as replicas sharing a volume do)."""
    if fcntl is None:
        return None
    fd = os.open(folder / OWNER_LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def _work_dir(root: Path, prefix: str) -> tuple[Path, int | None]:
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    return folder, _claim(folder)


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def sweep_stale(root: Path) -> list[Path]:
    """Remove the work folders (`.<name>` in the cache) of exports that were killed midway: their owner's lock
    is free. A live export keeps its folder (its owner holds the lock); a folder without a lock file is left
    until it is a day old, since its owner may have only just created it."""
    removed = []
    for folder in sorted(root.glob(".*")) if root.is_dir() else []:
        if not folder.is_dir():
            continue
        lock = folder / OWNER_LOCK
        if fcntl is not None and lock.exists():
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue  # its owner is removing it
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a live export
            try:
                shutil.rmtree(folder, ignore_errors=True)
            finally:
                os.close(fd)
        elif time.time() - folder.stat().st_mtime > UNLOCKED_MAX_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            continue
        removed.append(folder)
    if removed:
        log.info("removed %d unfinished export folder(s) from %s", len(removed), root)
    return removed


def ensure_onnx_export(model: str | Path | ModelSource, unet_file: str | Path | ModelSource | None = None,
                       precisions: tuple[str, ...] = ("fp32",), progress: bool = True) -> Path:
    """The cache folder holding a verified export of this model, exporting it first when needed. `model`: any
    form nitrofusion/sources.py resolves. The key is the content alone (a folder reached as a path or as a hub
    id shares one entry); the manifest records the name the model was given, its path and revision."""
    from .onnx_export import export_onnx

    sweep_stale(cache_root() / "onnx")
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
    tmp, owner = _work_dir(root, f".{key[:12]}-")
    try:
        export_onnx(source, tmp / "export", unet_file=unet_file, precisions=precisions, progress=progress,
                    cache_key=key, source_hash=source_hash)
        if entry.exists():
            stale, stale_owner = _work_dir(root, ".stale-")
            try:
                os.replace(entry, stale / "old")
            except FileNotFoundError:
                pass  # another process moved it first
            shutil.rmtree(stale, ignore_errors=True)
            _release(stale_owner)
        try:
            os.replace(tmp / "export", entry)
        except OSError:
            # Another process finished the same export first: use theirs if it checks out.
            if _entry_problem(entry, key) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        _release(owner)
    memo.save()
    return entry
