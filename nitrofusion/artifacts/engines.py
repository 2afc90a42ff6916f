"""TensorRT engine folders as the runtime reads them: batch-bucket profiles, picking the profile for a call,
and the engine manifest. Needs no TensorRT (unit-tested everywhere); export/tensorrt_build.py builds them.

One static optimisation profile per (batch bucket, latent size): static shapes are what make TensorRT fast
for this model. The bucket list is the engine's (`EngineConfig.buckets`), passed down from the server's
settings, so the engine's padding, the CUDA graphs and the profiles agree.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InvalidRequest, ModelLoadError, NitroError

ENGINE_MANIFEST = "nitrofusion_engines.json"
ENGINE_FORMAT_VERSION = 1


@dataclass(frozen=True, order=True)
class Profile:
    """One static shape set: `batch` rows of latents `height` x `width` (latent pixels)."""

    batch: int
    height: int
    width: int

    def shapes(self, inputs: dict[str, dict]) -> dict[str, tuple[int, ...]]:
        """Static input shapes from an ONNX manifest's symbolic ones (B, h, w)."""
        known = {"B": self.batch, "h": self.height, "w": self.width}
        out = {}
        for name, spec in inputs.items():
            dims = []
            for d in spec["shape"]:
                if isinstance(d, str) and d not in known:
                    raise NitroError(f"input {name} has axis {d!r} that no TensorRT profile fixes")
                dims.append(known[d] if isinstance(d, str) else int(d))
            out[name] = tuple(dims)
        return out


class ShapeOutsideProfiles(InvalidRequest):
    """A call whose shape no built engine profile covers: a clear request error (HTTP 422), never a crash."""


def plan_profiles(buckets: tuple[int, ...] | list[int], sizes: list[tuple[int, int]], vae_scale_factor: int
                  ) -> list[Profile]:
    """One profile per (size, bucket), sorted; sizes in pixels, profiles in latent pixels."""
    if not buckets or any(b < 1 for b in buckets):
        raise InvalidRequest("buckets", "batch buckets must be positive integers, e.g. 1,2,4,8,16")
    profiles = set()
    for w, h in sizes:
        if w % vae_scale_factor or h % vae_scale_factor:
            raise InvalidRequest("sizes", f"{w}x{h} is not a multiple of the VAE factor {vae_scale_factor}")
        for b in buckets:
            profiles.add(Profile(int(b), h // vae_scale_factor, w // vae_scale_factor))
    return sorted(profiles)


def batch_profiles(profiles: list[Profile]) -> list[Profile]:
    """For graphs with no spatial axes (text encoders): one profile per batch size."""
    return sorted({Profile(p.batch, 0, 0) for p in profiles})


def select_profile(profiles: list[Profile], batch: int, height: int, width: int, vae_scale_factor: int = 8
                   ) -> Profile:
    """The smallest-batch profile of this latent size that holds `batch` rows; rows are padded up to it."""
    fits = [p for p in profiles if p.height == height and p.width == width and p.batch >= batch]
    if fits:
        return min(fits)
    same_size = [p for p in profiles if p.height == height and p.width == width]
    if same_size:
        raise ShapeOutsideProfiles(
            "batch", f"{batch} rows is more than the largest TensorRT profile ({max(same_size).batch}) for this size; "
            "rebuild the engines with a larger bucket (--buckets)")
    built = sorted({(p.width * vae_scale_factor, p.height * vae_scale_factor) for p in profiles})
    listed = ", ".join(f"{w}x{h}" for w, h in built)
    raise ShapeOutsideProfiles(
        "width", f"{width * vae_scale_factor}x{height * vae_scale_factor} has no TensorRT engine profile (built for "
        f"{listed}); use one of those sizes or rebuild the engines with --sizes")


def component_profiles(name: str, profiles: list[Profile]) -> list[Profile]:
    """Text encoders have no spatial axes: one profile per batch size; every other component all of them."""
    return batch_profiles(profiles) if name.startswith("text_encoder") else profiles


@dataclass
class EngineRecord:
    component: str
    file: str  # relative to the engine folder
    key: str
    key_inputs: dict
    sha256: str  # of the engine file: a truncated or swapped file is rebuilt, not loaded


@dataclass
class EngineManifest:
    engines: dict[str, EngineRecord]
    onnx_dir: str  # the ONNX export the engines were built from, relative to the engine folder
    buckets: list[int]
    sizes: list[list[int]]  # [[width, height]] in pixels
    precision: str
    format_version: int = ENGINE_FORMAT_VERSION
    extras: dict = field(default_factory=dict)

    def write(self, root: Path) -> None:
        tmp = root / (ENGINE_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, root / ENGINE_MANIFEST)

    @classmethod
    def read(cls, root: Path) -> EngineManifest:
        path = Path(root) / ENGINE_MANIFEST
        try:
            data = json.loads(path.read_text())
            data["engines"] = {k: EngineRecord(**v) for k, v in data["engines"].items()}
            return cls(**data)
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"TensorRT engine manifest {path} is unreadable ({e}); build the engines again") \
                from None


def is_engine_dir(path: str | Path | None) -> bool:
    return path is not None and (Path(path).expanduser() / ENGINE_MANIFEST).is_file()


class TensorRTUnavailable(NitroError):
    """TensorRT or a CUDA GPU is missing."""


def require_tensorrt():
    """The tensorrt module, or a one-line error saying how to get it."""
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable(
            "TensorRT is not installed here: --backend tensorrt and --format tensorrt need the tensorrt Python "
            "package (TensorRT 10) and a CUDA GPU; use the GPU Docker image (docker/Dockerfile.gpu)"
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU and this machine has none (torch sees no CUDA device)")
    return trt
