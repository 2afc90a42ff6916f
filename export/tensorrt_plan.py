"""TensorRT build planning that needs no TensorRT: precision flags, engine cache keys, whether a recorded
engine is stale, the --sizes parser. Unit-tested on machines without TensorRT. What the runtime reads
(profiles, profile choice, the engine manifest) is in nitrofusion/artifacts/engines.py."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nitrofusion.artifacts.engines import ENGINE_FORMAT_VERSION, EngineRecord, Profile
from nitrofusion.artifacts.manifest import sha256_file
from nitrofusion.errors import InvalidRequest, NitroError

# What each --precision turns on in the builder. fp8 needs Q/DQ nodes in the ONNX (a quantised export);
# fp16 stays on beside it for the layers fp8 does not cover.
PRECISION_FLAGS = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "fp8": ("FP8", "FP16")}


def component_precision(name: str, precision: str) -> str:
    """The SDXL VAE overflows in fp16 (as in the torch backend): its decoder is built bf16 instead."""
    return "bf16" if name == "vae_decoder" and precision in ("fp16", "fp8") else precision


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


def engine_problem(root: Path, record: EngineRecord | None, expected_key: str) -> str | None:
    """None when the recorded engine may be loaded, else why it must be rebuilt (stale or foreign)."""
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
