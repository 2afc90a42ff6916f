"""Check an exported graph against torch: ONNX Runtime (CPU) and the torch module on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nitrofusion.errors import ExportVerificationError

# Max |onnx - torch| allowed, relative to max(1, max |torch output|). fp16 rounds weights and activations.
TOLERANCES = {"fp32": 1e-3, "fp16": 5e-2}


def cpu_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # warnings about unused initializers etc. are noise here
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # torch runs next to it
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@torch.inference_mode()
def max_abs_diff(path: Path, module: torch.nn.Module, input_names: list[str],
                 samples: list[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
    """(max |onnx - torch| over every output and sample, max |torch output|)."""
    sess = cpu_session(path)
    worst, scale = 0.0, 0.0
    for inputs in samples:
        ref = module(*inputs)
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = sess.run(None, {n: x.numpy() for n, x in zip(input_names, inputs)})
        for r, o in zip(ref, got):
            r = r.float().numpy()
            if o.shape != r.shape:
                raise ExportVerificationError(f"{path}: output shape {o.shape} differs from torch's {r.shape}")
            worst = max(worst, float(np.abs(o.astype(np.float32) - r).max()))
            scale = max(scale, float(np.abs(r).max()))
    return worst, scale


def verify(name: str, precision: str, path: Path, module: torch.nn.Module, input_names: list[str],
           samples: list[tuple[torch.Tensor, ...]], tolerance: float | None = None) -> tuple[float, float]:
    """Return (max diff, allowed); raise ExportVerificationError past the tolerance."""
    tol = TOLERANCES[precision] if tolerance is None else tolerance
    diff, scale = max_abs_diff(path, module, input_names, samples)
    allowed = tol * max(1.0, scale)
    if not diff <= allowed:  # also catches NaN
        raise ExportVerificationError(
            f"exported {name} ({precision}) differs from torch by {diff:.3g} (allowed {allowed:.3g}) on sample "
            f"inputs; the export is not usable"
        )
    return diff, allowed
