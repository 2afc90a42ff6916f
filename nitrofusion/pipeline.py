"""One loaded model ready to generate: backend + sampler + request limits. What the CLI and server hold."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends.torch_backend import TorchBackend, resolve_device_dtype
from .errors import NitroError
from .generation import GenerationRequest, generate
from .limits import SizeLimits, check_prompt, check_seed, check_size, check_steps
from .models import LoadedModel, load_model
from .sampler import LCMSampler
from .tokens import TokenCounter

log = logging.getLogger(__name__)


def default_model_dir() -> Path | None:
    """The bundled default model, once the trainer has produced it (models/default in the repository)."""
    candidate = Path(__file__).resolve().parent.parent / "models" / "default"
    return candidate if (candidate / "model_index.json").is_file() else None


@dataclass
class Pipeline:
    model: LoadedModel
    backend: TorchBackend
    sampler: LCMSampler
    # The length check's own tokenizers: the backend's are the engine thread's (nitrofusion/tokens.py).
    tokens: TokenCounter = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tokens = TokenCounter(self.model.tokenizers)

    @property
    def shift(self) -> int:
        return self.model.shift

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits.for_native(self.model.native_size)

    def validate(self, req: GenerationRequest) -> None:
        """Raise InvalidRequest naming the first bad field."""
        check_prompt(req.prompt, self.tokens.count, self.model.max_prompt_tokens)
        check_steps(req.steps)
        check_seed(req.seed)
        check_size("width", req.width, self.size_limits)
        check_size("height", req.height, self.size_limits)
        backend_check = getattr(self.backend, "check_request", None)
        if backend_check is not None:
            backend_check(req)  # e.g. TensorRT: a size outside every engine profile

    def __call__(self, requests: list[GenerationRequest]) -> list[np.ndarray]:
        for r in requests:
            self.validate(r)
        return generate(self.backend, self.sampler, requests, self.shift)


def load_pipeline(model_dir: str | Path | None, unet_file: str | Path | None = None, shift: int | None = None,
                  device: str | None = None, dtype: str | None = None, backend: str | None = None) -> Pipeline:
    """backend: torch | onnxruntime | tensorrt. None (auto): what an export folder was made for; else
    onnxruntime on the CPU (fp32; the first load exports the folder to ONNX into the cache, export/cache.py),
    torch on CUDA (see backends/select.py: resolve_backend_name)."""
    if model_dir is None:
        model_dir = default_model_dir()
        if model_dir is None:
            raise NitroError(
                "no --model given and no bundled default model in this checkout yet: "
                "pass --model DIR, NITRO_MODEL=DIR or `make run MODEL=DIR` (a local diffusers folder, e.g. SDXL base)"
            )
    from .backends.select import load_backend, resolve_backend_name

    name = resolve_backend_name(backend, model_dir, device, dtype)
    if name != "torch":
        from export.manifest import is_export_dir
        from export.verify import ExportVerificationError

        try:
            model, runtime = load_backend(name, model_dir, unet_file, shift, device, dtype)
        except (OSError, ExportVerificationError) as e:
            if backend is not None or is_export_dir(model_dir):
                raise
            # Auto picked onnxruntime for a diffusers folder, but its export cannot be written (read-only
            # home, full disk) or does not match torch: torch runs the folder as it is, so use it.
            log.warning("onnxruntime unavailable for %s (%s: %s); using torch (set NITRO_CACHE_DIR to a writable "
                        "folder, or pass --backend torch)", model_dir, type(e).__name__, e)
        else:
            return Pipeline(model, runtime, LCMSampler.from_scheduler_config(model.scheduler_config))
    resolve_device_dtype(device, dtype)  # a bad device or dtype fails before the (slow) model load
    model = load_model(model_dir, unet_file=unet_file, shift=shift)
    backend = TorchBackend(model, device=device, dtype=dtype)
    return Pipeline(model, backend, LCMSampler.from_scheduler_config(model.scheduler_config))
