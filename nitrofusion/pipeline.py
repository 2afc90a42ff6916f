"""One loaded model ready to generate: backend + sampler + request limits. What the CLI and server hold."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .artifacts.builder import ArtifactBuilder
from .backends.base import Backend
from .backends.select import load_backend
from .errors import NitroError
from .generation import GenerationRequest, generate
from .limits import SizeLimits, check_decoder, check_prompt, check_seed, check_size, check_steps
from .models import LoadedModel
from .sampler import LCMSampler
from .scheduler import DEFAULT_BUCKETS
from .tokens import TokenCounter


def default_model_dir() -> Path | None:
    """The bundled default model, once the trainer has produced it (models/default in the repository)."""
    candidate = Path(__file__).resolve().parent.parent / "models" / "default"
    return candidate if (candidate / "model_index.json").is_file() else None


@dataclass
class Pipeline:
    model: LoadedModel
    backend: Backend
    sampler: LCMSampler
    buckets: tuple[int, ...] = DEFAULT_BUCKETS  # what the backend captured graphs / built engines for
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
        check_decoder(req.decoder)
        self.backend.check_request(req)  # e.g. TensorRT: a size outside every engine profile

    def __call__(self, requests: list[GenerationRequest]) -> list[np.ndarray]:
        for r in requests:
            self.validate(r)
        return generate(self.backend, self.sampler, requests, self.shift)

    def warm_up(self, sizes: list[tuple[int, int]] | None = None) -> int:
        """Pay first-call costs before serving: with CUDA graphs, a capture for every size x declared bucket;
        otherwise one 1-step image at the native size. Returns the number of generations run."""
        native = self.model.native_size
        sizes = sizes or [(native, native)]

        def run(width: int, height: int, batch: int) -> None:
            self([GenerationRequest(f"warm-up {i}", 1, i, width, height) for i in range(batch)])

        runs = self.backend.warm_up(run, sizes, self.buckets)
        if runs == 0:
            run(*sizes[0], 1)
            runs = 1
        return runs


def load_pipeline(model_dir: str | Path | None, unet_file: str | Path | None = None, shift: int | None = None,
                  device: str | None = None, dtype: str | None = None, backend: str | None = None,
                  buckets: tuple[int, ...] | None = None, builder: ArtifactBuilder | None = None,
                  config: str | Path | None = None) -> Pipeline:
    """model_dir: a diffusers or export folder, a cached Hugging Face repo id, or a single-file checkpoint
    (`config`: its configs and tokenizers; nitrofusion/sources.py). backend: torch | onnxruntime | tensorrt. None (auto): what an export folder was made for; else
    onnxruntime on the CPU (fp32; with a `builder`, export/builder.py, the first load exports the folder to ONNX
    into the cache), torch on CUDA (backends/select.py). `buckets`: the engine's batch buckets, passed down to
    CUDA-graph capture and TensorRT profiles (default nitrofusion.scheduler.DEFAULT_BUCKETS)."""
    if model_dir is None:
        model_dir = default_model_dir()
        if model_dir is None:
            raise NitroError(
                "no --model given and no bundled default model in this checkout yet: "
                "pass --model, NITRO_MODEL or `make run MODEL=...`: a local diffusers folder, a repo id in the Hugging "
                "Face cache (e.g. stabilityai/stable-diffusion-xl-base-1.0) or a single-file .safetensors checkpoint"
            )
    buckets = tuple(buckets or DEFAULT_BUCKETS)
    model, runtime = load_backend(model_dir, unet_file, shift, device, dtype, backend, buckets, builder, config)
    return Pipeline(model, runtime, LCMSampler.from_scheduler_config(model.scheduler_config), buckets)
