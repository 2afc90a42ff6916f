"""The interface every backend (torch, ONNX Runtime, TensorRT) implements, and the conditioning it passes."""

from __future__ import annotations

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
