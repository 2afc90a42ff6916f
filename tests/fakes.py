"""A deterministic fake backend for engine tests: fast, controllable, and able to fail on demand."""

from __future__ import annotations

import threading
import zlib

import numpy as np
import torch

from nitrofusion.backends.base import Backend, Conditioning


class FakeBackend(Backend):
    """eps depends on latents, timestep and prompt; 'images' are a deterministic function of latents.

    Prompts containing 'decode-boom' fail in decode, 'unet-boom' in the UNet, 'nan' give non-finite eps.
    `gate` (when set to an Event) blocks every UNet call until it is set: tests use it to act mid-flight.
    """

    name = "fake"
    latent_channels = 4
    vae_scale_factor = 1

    def __init__(self):
        super().__init__(model=None)
        self.unet_calls: list[list[int]] = []  # timesteps per call (after bucket padding)
        self.gate: threading.Event | None = None
        self.entered = threading.Event()  # set when a UNet call has started
        self.encoded: list[list[str]] = []

    def encode_text(self, prompts, sizes):
        self.encoded.append(list(prompts))
        vals = [zlib.crc32(p.encode()) % 1000 / 1000 for p in prompts]
        emb = torch.tensor(vals).view(-1, 1, 1).expand(-1, 2, 3).clone()
        return Conditioning(emb)

    def unet(self, latents, timesteps, cond):
        self.unet_calls.append(list(timesteps))
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"
        t = torch.tensor(timesteps, dtype=torch.float32).view(-1, 1, 1, 1)
        eps = 0.5 * latents + t / 1000 + cond.embeds.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return eps

    def decode(self, latents):
        return self._to_image(latents)

    @property
    def has_fast_decoder(self) -> bool:
        return True

    def decode_fast(self, latents):
        return self._to_image(latents)

    @staticmethod
    def _to_image(latents: torch.Tensor) -> np.ndarray:
        img = (latents[:, :3].clamp(-1, 1) * 127.5 + 127.5).round().to(torch.uint8)
        return img.permute(0, 2, 3, 1).numpy()


class FailingFakeBackend(FakeBackend):
    """Fails the rows of chosen prompts: kind 'unet' raises in the UNet call that contains the row,
    'nan' gives it non-finite eps, 'decode' marks its latents so that the final decode raises."""

    MARK = 1e7

    def __init__(self, bad: dict[str, str]):
        super().__init__()
        self.bad = {self.prompt_value(p): kind for p, kind in bad.items()}

    @staticmethod
    def prompt_value(prompt: str) -> float:
        return round(zlib.crc32(prompt.encode()) % 1000 / 1000, 6)

    def unet(self, latents, timesteps, cond):
        kinds = [self.bad.get(round(float(v), 6)) for v in cond.embeds[:, 0, 0]]
        if "unet" in kinds:
            raise RuntimeError("injected UNet failure")
        eps = super().unet(latents, timesteps, cond)
        for i, kind in enumerate(kinds):
            if kind == "nan":
                eps[i] = float("nan")
            elif kind == "decode":
                eps[i, 3] = -self.MARK
        return eps

    def decode(self, latents):
        if (latents[:, 3].abs() > self.MARK / 100).any():
            raise RuntimeError("injected decode failure")
        return super().decode(latents)
