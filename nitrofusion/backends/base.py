"""The one interface every backend (torch, ONNX Runtime, TensorRT) implements, the conditioning it passes, and
what they share: tokenising, the per-prompt embedding cache and latent unscaling."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidRequest
from ..transfer import to_device


@dataclass
class Conditioning:
    """Text conditioning for a batch of rows. SDXL adds the pooled embedding and the size 'time ids'."""

    embeds: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P), SDXL only
    time_ids: torch.Tensor | None = None  # (B, 6), SDXL only

    @staticmethod
    def from_text(embeds: torch.Tensor, pooled: torch.Tensor | None, sizes: list[tuple[int, int]],
                  family: str) -> Conditioning:
        """Rows for each (width, height): SD1.x needs the embeddings only; SDXL adds the pooled embedding and
        its micro-conditioning time ids, original size + crop (0, 0) + target size, as (height, width)."""
        if family == "sd":
            return Conditioning(embeds)
        time_ids = to_device(torch.tensor([[h, w, 0, 0, h, w] for (w, h) in sizes], dtype=embeds.dtype),
                             embeds.device)
        return Conditioning(embeds, pooled, time_ids)

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def row(self, i: int) -> Conditioning:
        return Conditioning(
            self.embeds[i : i + 1],
            None if self.pooled is None else self.pooled[i : i + 1],
            None if self.time_ids is None else self.time_ids[i : i + 1],
        )

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        def cat_opt(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if ts[0] is None else torch.cat(ts)  # type: ignore[arg-type]

        return Conditioning(
            torch.cat([p.embeds for p in parts]),
            cat_opt([p.pooled for p in parts]),
            cat_opt([p.time_ids for p in parts]),
        )


class PromptCache:
    """Per-prompt (embeds, pooled) rows, least recently used dropped past `size`."""

    def __init__(self, size: int):
        self.size = size
        self._rows: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    def get(self, prompts: list[str], encode) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        if missing:
            emb, pooled = encode(missing)
            for i, p in enumerate(missing):
                self._rows[p] = (emb[i : i + 1], None if pooled is None else pooled[i : i + 1])
        for p in prompts:
            self._rows.move_to_end(p)
        parts = [self._rows[p] for p in prompts]
        while len(self._rows) > self.size:
            self._rows.popitem(last=False)
        emb = torch.cat([e for e, _ in parts])
        pooled = None if parts[0][1] is None else torch.cat([q for _, q in parts])  # type: ignore[misc]
        return emb, pooled


class Pending:
    """A device tensor on its way to host memory. On CUDA the copy goes to pinned memory without blocking and an
    event marks its end, so the engine can launch the next UNet step before it waits; on the CPU it is there
    already. `ready()` asks without blocking; `result()` blocks until the host tensor is complete."""

    def __init__(self, value: torch.Tensor):
        if value.is_cuda:
            self.host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.host.copy_(value, non_blocking=True)
            self.event: torch.cuda.Event | None = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(value.device))
        else:
            self.host, self.event = value, None

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())

    def result(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host


class Backend:
    """What the engine, the sampler loop and the pipeline need from a model runtime.

    A subclass sets `name`, `device`, `latent_channels`, `vae_scale_factor` and implements `run_text_encoder`,
    `unet` and `decode_unscaled` (plus `decode_fast` when it has a tiny decoder). Not thread-safe: one thread
    (the engine's) owns a backend; request validation uses its own tokenizers (nitrofusion/tokens.py).
    """

    name = "backend"
    device = torch.device("cpu")
    latent_channels = 4
    vae_scale_factor = 8

    def __init__(self, model: Any, text_cache_size: int = 1024):
        self.model = model
        self._text_cache = PromptCache(text_cache_size)

    # -- text ----------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> list[torch.Tensor]:
        """(B, max_length) int64 token ids per tokenizer, padded and truncated as diffusers' encode_prompt."""
        return [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids for tok in self.model.tokenizers]

    def run_text_encoder(self, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Text encoder `index` on (B, L) ids: (hidden states for the embeddings, pooled projection or None)."""
        raise NotImplementedError

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every encoder's hidden states concatenated, and the pooled projection (SDXL's second encoder)."""
        embeds, pooled = [], None
        for i, ids in enumerate(self.tokenize(prompts)):
            hidden, proj = self.run_text_encoder(i, ids)
            embeds.append(hidden)
            if proj is not None:
                pooled = proj
        return torch.cat(embeds, dim=-1), pooled

    def encode_text(self, prompts: list[str], sizes: list[tuple[int, int]]) -> Conditioning:
        """Conditioning for each (prompt, (width, height)) row; embeddings cached per prompt."""
        emb, pooled = self._text_cache.get(prompts, self._encode_uncached)
        return Conditioning.from_text(emb, pooled, sizes, self.model.family)

    # -- denoiser ------------------------------------------------------------------------------------
    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        """Model output (epsilon) for (B, C, h, w) fp32 latents, one timestep per row; fp32 on `device`."""
        raise NotImplementedError

    def sampler_step(self, sampler, sample: torch.Tensor, model_output: torch.Tensor, timesteps: list[int],
                     next_levels: list[int], noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, x_next) for every row: `LCMSampler.step`; the torch backend swaps in the fused kernel on CUDA."""
        return sampler.step(sample, model_output, timesteps, next_levels, noise)

    # -- images --------------------------------------------------------------------------------------
    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents -> what the VAE decoder takes: undo scaling_factor (and SDXL-style mean / std)."""
        cfg = self.model.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, latents.shape[1], 1, 1)
            mean_t = to_device(torch.tensor(mean, dtype=latents.dtype).view(shape), latents.device)
            std_t = to_device(torch.tensor(std, dtype=latents.dtype).view(shape), latents.device)
            return latents * std_t / cfg.scaling_factor + mean_t
        return latents / cfg.scaling_factor

    def decode_unscaled(self, z: torch.Tensor) -> np.ndarray:
        """The full VAE decoder on unscaled latents -> (B, H, W, 3) uint8."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) sampler latents -> (B, H, W, 3) uint8 images with the full VAE decoder."""
        return self.decode_unscaled(self.unscale(latents.float()))

    @property
    def has_fast_decoder(self) -> bool:
        return False

    def decode_fast(self, latents: torch.Tensor) -> np.ndarray:
        """The tiny decoder (`vae_preview/`, AutoencoderTiny) on the sampler latents as they are."""
        raise NotImplementedError

    def decode_with(self, latents: torch.Tensor, decoder: str) -> np.ndarray:
        return self.decode_fast(latents) if decoder == "fast" else self.decode(latents)

    def preview(self, latents: torch.Tensor) -> np.ndarray:
        """A quick look at predicted x0 between steps: the tiny decoder when the model has one, else the full."""
        return self.decode_fast(latents) if self.has_fast_decoder else self.decode(latents)

    def decode_async(self, latents: torch.Tensor, decoder: str, preview: bool = False) -> Pending:
        """Launch a decode (final latents with `decoder`, or `preview` of x0) and return without waiting for it:
        `Pending.result()` is the (B, H, W, 3) uint8 images. Here it runs at once; the torch backend on CUDA
        runs it on its own stream, next to the following UNet step."""
        images = self.preview(latents) if preview else self.decode_with(latents, decoder)
        return Pending(torch.from_numpy(np.ascontiguousarray(images)))

    # -- requests ------------------------------------------------------------------------------------
    def check_request(self, req: Any) -> None:
        """Backend-specific limits, raised as InvalidRequest before a request is queued (e.g. TensorRT: a size
        outside every engine profile; any backend: `decoder: fast` on a model without a tiny decoder)."""
        if getattr(req, "decoder", "full") == "fast" and not self.has_fast_decoder:
            raise InvalidRequest("decoder", "'fast' needs a tiny decoder in the model folder's vae_preview/ "
                                 "(an AutoencoderTiny such as TAESDXL for SDXL, TAESD for SD1.x; docs/decoders.md); "
                                 "this model has none: use 'full'")

    def warm_up(self, run, sizes: list[tuple[int, int]], buckets: tuple[int, ...]) -> int:
        """Backends that capture per-shape work (CUDA graphs) run it here before serving; 0 = nothing to do."""
        return 0
