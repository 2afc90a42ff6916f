"""Where the Triton kernel tests run: compiled on CUDA, else the CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before triton is imported), else they skip saying why."""

from __future__ import annotations

import pytest
import torch

from kernels import available, interpreting

if torch.cuda.is_available():
    DEVICE, SKIP_REASON = "cuda", None
elif not available():
    DEVICE, SKIP_REASON = "cpu", "triton is not installed (pip install -r requirements/kernels.txt)"
elif not interpreting():
    DEVICE, SKIP_REASON = "cpu", "no CUDA and triton was imported without TRITON_INTERPRET=1"
else:
    DEVICE, SKIP_REASON = "cpu", None

needs_kernels = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: CUDA-graph capture and replay run only on a GPU")

# Output tolerances per dtype (one or two units in the last place of the output dtype near |y| ~ 4).
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3},
       torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}
