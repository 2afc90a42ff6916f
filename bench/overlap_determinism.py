"""Does decode overlap change an image, or does something else make two engine runs differ? (GPU diagnostic)

tests/test_engine_cuda.py asserts that the engine gives the same bytes with NITROFUSION_OVERLAP off and on. On an
H200 (2026-11-30) it failed by 1/255 on a few pixels. This runs the test's ten mixed-step requests through the
engine four times on one pipeline, off, off, on, on, and prints every pair's differences with the CUDA-graph
counters, which separates "overlap changes bits" from "the first run (where the graphs are captured) differs from
later ones". Then the same with CUDA graphs off, and with kernels and graphs off.

    python bench/overlap_determinism.py            # needs CUDA; ~40 s on an H200 (tiny SDXL model, three settings)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nitrofusion.engine import Engine, EngineConfig, Job  # noqa: E402
from nitrofusion.generation import GenerationRequest  # noqa: E402
from nitrofusion.pipeline import load_pipeline  # noqa: E402
from nitrofusion.tiny import save_tiny_model  # noqa: E402

REQS = [GenerationRequest(f"prompt {i}", steps=1 + i % 4, seed=100 + i, width=32, height=32) for i in range(10)]


def run(pipe, overlap: bool) -> list[np.ndarray]:
    pipe.backend.decode_stream = torch.cuda.Stream(pipe.backend.device) if overlap else None
    engine = Engine(pipe.backend, pipe.sampler, pipe.shift, EngineConfig(max_batch=4, buckets=(1, 2, 4)))
    jobs = [engine.submit(Job([r])) for r in REQS]
    engine.start()
    try:
        return [j.future.result(timeout=300)[0] for j in jobs]
    finally:
        engine.stop()


def diff(a: list[np.ndarray], b: list[np.ndarray]) -> str:
    d = [np.abs(x.astype(np.int16) - y.astype(np.int16)) for x, y in zip(a, b)]
    return (f"max {max(int(x.max()) for x in d)}, images differing {sum(int(x.any()) for x in d)}/{len(d)}, "
            f"pixels differing {sum(int((x > 0).any(-1).sum()) for x in d)}")


def graphs(pipe) -> str:
    acc = pipe.backend.accel
    parts = []
    for name in ("unet_graphs", "vae_graphs"):
        g = getattr(acc, name, None)
        if g is not None:
            parts.append(f"{name} {g.summary()}")
    return "; ".join(parts) or "no graphs"


def main() -> int:
    if not torch.cuda.is_available():
        print("overlap_determinism: needs a CUDA device", file=sys.stderr)
        return 2
    folder = save_tiny_model(Path(tempfile.mkdtemp()) / "sdxl", "sdxl", seed=0)
    for label, env in [("kernels + graphs (default)", {}), ("kernels, no graphs", {"NITROFUSION_CUDA_GRAPHS": "0"}),
                       ("no kernels, no graphs", {"NITROFUSION_KERNELS": "0", "NITROFUSION_CUDA_GRAPHS": "0"})]:
        for k in ("NITROFUSION_KERNELS", "NITROFUSION_CUDA_GRAPHS"):
            os.environ.pop(k, None)
        os.environ.update(env)
        pipe = load_pipeline(folder, device="cuda", backend="torch", buckets=(1, 2, 4))
        runs = {}
        for name, overlap in [("off1", False), ("off2", False), ("on1", True), ("on2", True)]:
            runs[name] = run(pipe, overlap)
            print(f"[{label}] after {name}: {graphs(pipe)}", flush=True)
        alone = [pipe([r])[0] for r in REQS]
        for a, b in [("off1", "off2"), ("on1", "on2"), ("off2", "on1"), ("off1", "on1")]:
            print(f"[{label}] {a} vs {b}: {diff(runs[a], runs[b])}", flush=True)
        print(f"[{label}] alone vs on1: {diff(alone, runs['on1'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
