"""TensorRT engine planning that needs no TensorRT: batch-bucket profiles, picking a profile for a call,
engine cache keys and the engine manifest. Unit-tested on machines without TensorRT.

One static optimisation profile per (batch bucket, latent size): static shapes are what make TensorRT fast
for this model. The bucket list is the engine's (`EngineConfig.buckets`), declared once, so the engine's
padding, the CUDA graphs and the profiles agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nitrofusion.errors import InvalidRequest, ModelLoadError, NitroError

ENGINE_MANIFEST = "nitrofusion_engines.json"
ENGINE_FORMAT_VERSION = 1
# What each --precision turns on in the builder. fp8 needs Q/DQ nodes in the ONNX (a quantised export);
# fp16 stays on beside it for the layers fp8 does not cover.
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "fp8": ("FP8", "FP16")}


def component_precision(name: str, precision: str) -> str:
    """The SDXL VAE overflows in fp16 (as in the torch backend): its decoder is built bf16 instead."""
    return "bf16" if name == "vae_decoder" and precision in ("fp16", "fp8") else precision


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


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'1024x1024,832x1216' -> [(1024, 1024), (832, 1216)] as (width, height) in pixels."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        w, _, h = part.partition("x")
        if not (w.isdigit() and h.isdigit()) or int(w) <= 0 or int(h) <= 0:
            raise InvalidRequest("sizes", f"{part!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        sizes.append((int(w), int(h)))
    if not sizes:
        raise InvalidRequest("sizes", "give at least one WIDTHxHEIGHT")
    return sizes


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


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.9"


def engine_key_inputs(onnx_sha256: str, trt_version: str, gpu: GpuInfo, precision: str,
                      profiles: list[Profile], builder_options: dict | None = None) -> dict:
    """Everything that makes a serialized engine invalid when it changes."""
    if precision not in PRECISION_FLAGS:
        raise NitroError(f"unsupported TensorRT precision {precision!r}: use one of {', '.join(PRECISION_FLAGS)}")
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt": trt_version,
        "gpu": gpu.name,
        "compute_capability": gpu.compute_capability,
        "precision": precision,
        "flags": sorted(PRECISION_FLAGS[precision]),
        "profiles": [asdict(p) for p in sorted(profiles)],
        "builder": builder_options or {},
        "format_version": ENGINE_FORMAT_VERSION,
    }


def engine_cache_key(*args, **kwargs) -> str:
    return hashlib.sha256(json.dumps(engine_key_inputs(*args, **kwargs), sort_keys=True).encode()).hexdigest()


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


def engine_problem(root: Path, record: EngineRecord | None, expected_key: str) -> str | None:
    """None when the recorded engine may be loaded, else why it must be rebuilt (stale or foreign)."""
    from .manifest import sha256_file

    if record is None:
        return "not built yet"
    if record.key != expected_key:
        return "built for another ONNX, TensorRT version, GPU, precision or profile set"
    path = root / record.file
    if not path.is_file():
        return f"{path} is missing"
    if sha256_file(path) != record.sha256:
        return f"{path} does not match its recorded hash"
    return None
