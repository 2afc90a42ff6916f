"""Build TensorRT engines from an ONNX export (TensorRT 10 Python API; `tensorrt` is imported lazily).

Each component gets one engine with one static optimisation profile per (batch bucket, size), built with a
persisted timing cache. An engine is reused only when its cache key (ONNX hash, TensorRT version, GPU name
and compute capability, precision flags, profile shapes) matches; anything else is rebuilt.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tqdm import tqdm

from nitrofusion.artifacts.engines import (
    ENGINE_MANIFEST,
    EngineManifest,
    EngineRecord,
    Profile,
    component_profiles,
    plan_profiles,
    require_tensorrt,
)
from nitrofusion.artifacts.manifest import Manifest, read_manifest, sha256_file
from nitrofusion.errors import NitroError

from .tensorrt_plan import (
    PRECISION_FLAGS,
    GpuInfo,
    component_precision,
    engine_cache_key,
    engine_key_inputs,
    engine_problem,
)

log = logging.getLogger(__name__)
WORKSPACE_BYTES = 8 << 30
TIMING_CACHE = "timing.cache"


def gpu_info(device: int = 0) -> GpuInfo:
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return GpuInfo(torch.cuda.get_device_name(device), f"{major}.{minor}")


def build_engine(trt, onnx_path: Path, engine_path: Path, inputs: dict[str, dict], profiles: list[Profile],
                 precision: str, timing_cache: Path) -> None:
    """Parse the ONNX, add one static profile per entry of `profiles`, build, write engine + timing cache."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # follows external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise NitroError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in PRECISION_FLAGS[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name, shape in prof.shapes(inputs).items():
            p.set_shape(name, shape, shape, shape)  # static: min = opt = max
        config.add_optimization_profile(p)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise NitroError(f"TensorRT could not build an engine from {onnx_path} (see the log above)")
    tmp = engine_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, engine_path)
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))


def build_engines(onnx_dir: Path, engine_dir: Path, buckets: list[int], sizes: list[tuple[int, int]] | None = None,
                  precision: str = "fp16", progress: bool = True) -> EngineManifest:
    """Engines for every component of the ONNX export in `onnx_dir`, into `engine_dir` (reusing valid ones)."""
    trt = require_tensorrt()
    manifest: Manifest = read_manifest(onnx_dir)
    if "fp32" not in manifest.precisions:
        raise NitroError(f"{onnx_dir} has no fp32 ONNX graphs to build TensorRT engines from: export with "
                         "--precision fp32 (TensorRT picks its own reduced-precision kernels from --precision)")
    graphs = manifest.components["fp32"]  # the builder's flags decide the reduced precision
    sizes = sizes or [(manifest.native_size, manifest.native_size)]
    profiles = plan_profiles(buckets, sizes, manifest.vae_scale_factor)
    gpu = gpu_info()
    engine_dir.mkdir(parents=True, exist_ok=True)
    old = EngineManifest.read(engine_dir).engines if (engine_dir / ENGINE_MANIFEST).is_file() else {}
    records: dict[str, EngineRecord] = {}
    bar = tqdm(list(graphs.items()), desc="tensorrt", unit="engine", disable=not progress, leave=False)
    for name, entry in bar:
        bar.set_postfix_str(name)
        onnx_path = onnx_dir / entry.folder / "model.onnx"
        profs = component_profiles(name, profiles)
        onnx_hash = sha256_file(onnx_path)
        key_args = (onnx_hash, trt.__version__, gpu, component_precision(name, precision), profs)
        key = engine_cache_key(*key_args)
        problem = engine_problem(engine_dir, old.get(name), key)
        if problem is not None:
            log.warning("building TensorRT engine for %s (%s)", name, problem)
            build_engine(trt, onnx_path, engine_dir / f"{name}.plan", entry.inputs, profs,
                         component_precision(name, precision), engine_dir / TIMING_CACHE)
        records[name] = EngineRecord(name, f"{name}.plan", key, engine_key_inputs(*key_args),
                                     sha256_file(engine_dir / f"{name}.plan"))
    result = EngineManifest(records, os.path.relpath(onnx_dir, engine_dir), list(buckets),
                            [list(s) for s in sizes], precision)
    result.write(engine_dir)
    return result
