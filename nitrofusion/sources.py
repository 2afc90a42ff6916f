"""Where a model comes from: what `--model`, `--unet` and `--config` accept, resolved to files on this machine.

`--model` is checked in this order:
  1. a local path: a diffusers folder (or an export folder), or a single-file `.safetensors` checkpoint;
  2. `ORG/NAME[@REVISION]`: a repo already in the local Hugging Face cache (its `refs/main` snapshot, or the
     named branch, tag or commit);
  3. `ORG/NAME[@REVISION]/FILE.safetensors`: a single-file checkpoint from a cached repo.
`--unet` takes a local file or `ORG/NAME[@REVISION]/FILE.safetensors` (the NitroSD UNets live in one repo).

The cache is read with huggingface_hub, offline only: nothing is ever downloaded at run time. An id that is not
cached is one error naming the id, the cache folder searched and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

# Hub repo ids: ORG/NAME, each part letters, digits, '-', '_', '.' (huggingface_hub validates the rest).
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_REPO = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>\S+))?$")
_HUB_FILE = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?:@(?P<rev>[^/\s]+))?/(?P<file>\S+\.safetensors)$")
SINGLE_FILE_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class ModelSource:
    """One resolved model: `given` as the user wrote it, `path` what is read (a folder, a hub snapshot folder
    or a .safetensors file), and for hub sources the repo id and the snapshot's commit."""

    given: str
    kind: str  # "folder" | "hub" (a cached repo snapshot, a folder too) | "single_file" | "unet_file"
    path: Path
    repo_id: str | None = None
    revision: str | None = None  # commit hash of the snapshot read
    config: Path | None = None  # single files: the folder with the configs and tokenizers (nitrofusion/single_file.py)

    @property
    def name(self) -> str:
        """What /v1/models and the logs call the model: the hub id as given, else the file or folder name."""
        return self.given if self.repo_id else self.path.name

    @property
    def is_folder(self) -> bool:
        return self.kind in ("folder", "hub")

    def describe(self) -> dict:
        d = {"name": self.name, "given": self.given, "kind": self.kind, "path": str(self.path)}
        if self.repo_id:
            d.update(repo_id=self.repo_id, revision=self.revision)
        if self.config is not None:
            d["config"] = str(self.config)
        return d

    def label(self) -> str:
        """One line for logs: the name, then what it resolved to."""
        where = str(self.path) + (f", revision {self.revision}" if self.revision else "")
        return f"{self.name} ({where})"

    def content_hash(self, digest) -> str:
        """What the export cache keys on: the folder's files, or the single file plus the configs it needs."""
        import hashlib

        from .artifacts.manifest import hash_folder

        if self.is_folder:
            return hash_folder(self.path, digest)
        h = hashlib.sha256(b"single-file\0" + digest(self.path).encode())
        if self.config is not None:
            h.update(b"\0config\0" + hash_folder(self.config, digest).encode())
        return h.hexdigest()


def hub_cache_dir() -> Path:
    """The Hugging Face cache folder, by huggingface_hub's precedence: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE,
    HF_HOME/hub, XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub. Read from the environment at each
    call (huggingface_hub.constants reads it once, at import) so a server's or a test's setting counts."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(cache)).expanduser()


def fetch_hint(repo_id: str, revision: str | None, filename: str | None = None) -> str:
    """How to fetch a repo (or one file of it) into the cache: `hf download ...`, run once, online."""
    cmd = f"hf download {repo_id}" + (f" {filename}" if filename else "") + (f" --revision {revision}" if revision else "")
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    offline = " with HF_HUB_OFFLINE unset" if offline_env else ""
    return (f"fetch it once{offline} with `{cmd}` (huggingface_hub before 1.0: `huggingface-cli download` with the "
            "same arguments); nothing is downloaded at run time")


def _not_cached(what: str, given: str, repo_id: str, revision: str | None, filename: str | None = None) -> ModelLoadError:
    return ModelLoadError(
        f"{what} {given!r} is not a local path and not in the Hugging Face cache (searched {hub_cache_dir()}; "
        f"set HF_HUB_CACHE or HF_HOME if yours is elsewhere): {fetch_hint(repo_id, revision, filename)}"
    )


def _snapshot(given: str, repo_id: str, revision: str | None, what: str = "model") -> Path:
    """The cached snapshot folder of `repo_id` at `revision` (default main), offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or "main", cache_dir=hub_cache_dir(),
                                      local_files_only=True))
    except HFValidationError as e:
        raise ModelLoadError(f"{what} {given!r} is neither a local path nor a valid repo id: {e}") from None
    except LocalEntryNotFoundError as e:
        # huggingface_hub 1.x calls a snapshot incomplete (a subclass of this error, with its path) when files of
        # the repo's cached listing are missing, as after `hf download --include ...` limited to the diffusers
        # fp16 files: the snapshot is used, and what the model needs is checked when it loads.
        if getattr(e, "snapshot_path", None):
            return Path(e.snapshot_path)
        raise _not_cached(what, given, repo_id, revision) from None


def _hub_file(given: str, repo_id: str, revision: str | None, filename: str, what: str) -> Path:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=hub_cache_dir(), revision=revision or "main")
    except HFValidationError as e:
        raise ModelLoadError(f"{what} {given!r} is neither a local file nor a valid repo file: {e}") from None
    if not isinstance(found, str):  # None (unknown) or _CACHED_NO_EXIST (known to be absent)
        raise _not_cached(what, given, repo_id, revision, filename)
    return Path(found)


def _revision_of(path: Path) -> str | None:
    """The commit hash of a cached file: the name of the folder under `snapshots/` that holds it."""
    parts = path.parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots":
            return parts[i + 1]
    return None


def _check_snapshot_is_diffusers(given: str, repo_id: str, revision: str | None, folder: Path) -> None:
    if (folder / "model_index.json").is_file():
        return
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob(f"*{SINGLE_FILE_SUFFIX}"))
    if files and not any("/" in f for f in files):
        examples = ", ".join(f"{repo_id}/{f}" for f in files[:4])
        raise ModelLoadError(
            f"{given!r} (cached at {folder}) is not a diffusers model (no model_index.json); it holds single "
            f".safetensors files: pass one as --model ORG/NAME/FILE.safetensors (a full checkpoint) or "
            f"--unet ORG/NAME/FILE.safetensors (a UNet), e.g. {examples}"
        )
    raise ModelLoadError(
        f"{given!r} is in the Hugging Face cache ({folder}) without its model_index.json: only part of it was "
        f"downloaded, or it is not a diffusers model; {fetch_hint(repo_id, revision)}"
    )


def resolve_model(model: str | Path | ModelSource, config: str | Path | ModelSource | None = None) -> ModelSource:
    """`--model` (and `--config`, the configs and tokenizers for a single-file checkpoint) to a ModelSource."""
    if isinstance(model, ModelSource):
        return model
    given = str(model)
    local = Path(given).expanduser()
    if local.is_dir():
        source = ModelSource(given, "folder", local)
    elif local.is_file():
        source = _single_file_source(given, local)
    elif m := _HUB_FILE.match(given):
        path = _hub_file(given, m["repo"], m["rev"], m["file"], "model")
        source = ModelSource(given, "single_file", path, m["repo"], _revision_of(path))
    elif m := _HUB_REPO.match(given):
        folder = _snapshot(given, m["repo"], m["rev"])
        _check_snapshot_is_diffusers(given, m["repo"], m["rev"], folder)
        source = ModelSource(given, "hub", folder, m["repo"], folder.name)
    elif given.endswith(SINGLE_FILE_SUFFIX):
        raise ModelLoadError(f"single-file checkpoint not found: {local}")
    else:
        raise ModelLoadError(f"model folder not found: {local} (--model takes a diffusers folder, a cached "
                             "Hugging Face repo id ORG/NAME[@REVISION], or a .safetensors checkpoint)")
    if source.kind == "single_file":
        from .single_file import config_for

        cfg = resolve_config(config) if config is not None else None
        return ModelSource(source.given, source.kind, source.path, source.repo_id, source.revision,
                           config_for(source.path, cfg))
    if config is not None:
        raise ModelLoadError(f"--config applies to single-file checkpoints only; {given!r} is a folder with its "
                             "own configs")
    return source


def _single_file_source(given: str, path: Path) -> ModelSource:
    if path.suffix != SINGLE_FILE_SUFFIX:
        hint = " (a .ckpt is a pickle that can run code when loaded: convert it to .safetensors)" \
            if path.suffix == ".ckpt" else ""
        raise ModelLoadError(f"{path} is a file, not a model folder; single-file checkpoints are read only as "
                             f"{SINGLE_FILE_SUFFIX}{hint}")
    return ModelSource(given, "single_file", path)


def resolve_config(config: str | Path | ModelSource) -> Path:
    """`--config`: a local diffusers (or config-only) folder, or a cached repo id; returns the folder."""
    if isinstance(config, ModelSource):
        return config.path
    given = str(config)
    local = Path(given).expanduser()
    if local.is_dir():
        folder = local
    elif m := _HUB_REPO.match(given):
        folder = _snapshot(given, m["repo"], m["rev"], what="config")
    else:
        raise ModelLoadError(f"config folder not found: {local} (--config takes a diffusers folder or a cached "
                             "repo id ORG/NAME)")
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(f"--config {given}: {folder} has no model_index.json (a diffusers folder, e.g. SDXL "
                             "base, describes the checkpoint's architecture)")
    return folder


def resolve_unet(unet: str | Path | ModelSource) -> ModelSource:
    """`--unet`: a local .safetensors file, or ORG/NAME[@REVISION]/FILE.safetensors from the cache."""
    if isinstance(unet, ModelSource):
        return unet
    given = str(unet)
    local = Path(given).expanduser()
    if local.is_file():
        return ModelSource(given, "unet_file", local)
    if not local.exists() and (m := _HUB_FILE.match(given)):
        path = _hub_file(given, m["repo"], m["rev"], m["file"], "UNet file")
        return ModelSource(given, "unet_file", path, m["repo"], _revision_of(path))
    raise ModelLoadError(f"UNet file not found: {local} (--unet takes a .safetensors file or a cached "
                         "ORG/NAME/FILE.safetensors)")
