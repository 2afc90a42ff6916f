"""Triton kernels for the GPU hot path, module swapping that puts them into diffusers models, CUDA graphs.

Every kernel comes with a torch reference function (the semantics it must match) and a launcher that
checks shapes and dtypes and picks block sizes. Launchers run compiled on CUDA tensors, and on CPU tensors
only under Triton's interpreter (`TRITON_INTERPRET=1`, how the tests run in CI); everything else falls
back to the torch reference. Triton is optional: without it, `available()` is False and the references run.
"""

from ._common import available, can_launch, interpreting

__all__ = ["available", "can_launch", "interpreting"]
