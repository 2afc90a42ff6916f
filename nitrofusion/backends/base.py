"""The interface every backend (torch, ONNX Runtime, TensorRT) implements, and the conditioning it passes."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch


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
        time_ids = torch.tensor([[h, w, 0, 0, h, w] for (w, h) in sizes], dtype=embeds.dtype, device=embeds.device)
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


class Backend(Protocol):
    """What the sampler loop and the engine need from a model runtime."""

    latent_channels: int
    vae_scale_factor: int

    def encode_text(self, prompts: list[str], sizes: list[tuple[int, int]]) -> Conditioning:
        """Conditioning for each (prompt, (width, height)) row; embeddings cached per prompt."""

    def count_tokens(self, prompt: str) -> int: ...

    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        """Model output (epsilon) for (B, C, h, w) fp32 latents, one timestep per row; returns fp32."""

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, C, h, w) latents -> (B, H, W, 3) uint8 images."""
