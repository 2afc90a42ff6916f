"""What the torch backend switches on for CUDA: fused kernels in the UNet / VAE decoder, the one-pass uint8
postprocess, and CUDA graphs per batch bucket. One object per backend; `undo()` restores the models.

Switches (constructor arguments of TorchBackend win over the environment):
- kernels:     None -> on when the backend runs on CUDA and Triton is importable; NITROFUSION_KERNELS=0 turns
               the default off. True on the CPU works only under TRITON_INTERPRET=1 (tests).
- cuda_graphs: None -> on when the backend runs on CUDA; NITROFUSION_CUDA_GRAPHS=0 turns the default off. Measured
               on an H100 (BENCHMARKS.md): SDXL 1024^2 one request at a time serves 2.8x more images with them.
- vae_mode:    decoder-speed options (kernels/vae_fast.py: channels_last, cudnn_benchmark, subpixel, compile[=MODE],
               fp16), as text or DecoderOptions; None -> $NITRO_VAE, else vae_fast.DEFAULT_VAE_MODE (today's
               path). The fused kernels in the decoder follow `kernels`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._common import available, interpreting
from .cuda_graphs import CudaGraphCapturer, GraphCache
from .patch import PatchHandle, patch_unet
from .postprocess import to_uint8 as fused_to_uint8
from .vae_fast import PreparedDecoder, options_from_env, prepare_decoder

VAE_MAX_GRAPH_BATCH = 8  # bigger decode batches run eagerly (a b16 1024^2 decoder graph is tens of GB)


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def resolve_kernels(kernels: bool | None, device: torch.device) -> bool:
    if kernels is None:
        env = _env_flag("NITROFUSION_KERNELS")
        return device.type == "cuda" and available() and env is not False
    if kernels and not available():
        raise ValueError("kernels=True needs triton (pip install -r requirements/kernels.txt)")
    if kernels and device.type != "cuda" and not interpreting():
        raise ValueError("kernels=True needs a CUDA device (or TRITON_INTERPRET=1, for tests on the CPU)")
    return bool(kernels)


def resolve_cuda_graphs(cuda_graphs: bool | None, device: torch.device) -> bool:
    if cuda_graphs is None:
        return device.type == "cuda" and _env_flag("NITROFUSION_CUDA_GRAPHS") is not False
    if cuda_graphs and device.type != "cuda":
        raise ValueError("cuda_graphs=True needs a CUDA device")
    return bool(cuda_graphs)


@dataclass
class Accelerator:
    kernels: bool = False
    cuda_graphs: bool = False
    buckets: tuple[int, ...] = ()  # the engine's batch buckets, passed down by the backend
    handles: list[PatchHandle] = field(default_factory=list)
    unet_graphs: GraphCache | None = None
    vae_graphs: GraphCache | None = None
    text_graphs: list[GraphCache] | None = None  # one per text encoder
    vae_decoder: PreparedDecoder | None = None  # None: vae.decode as diffusers runs it
    _unet: Any = None
    _vae: Any = None
    _text_fns: list = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.kernels or self.cuda_graphs or self.vae_decoder is not None

    @classmethod
    def for_backend(cls, backend: Any, buckets: tuple[int, ...], kernels: bool | None = None,
                    cuda_graphs: bool | None = None, vae_mode: Any = None) -> Accelerator:
        """`buckets`: the engine's batch buckets (passed down from the settings), one graph per bucket."""
        acc = cls(resolve_kernels(kernels, backend.device), resolve_cuda_graphs(cuda_graphs, backend.device),
                  tuple(buckets))
        model = backend.model
        acc._unet, acc._vae = model.unet, model.vae
        # The backend decides what each encoder returns (family-specific); graphs only replay it.
        acc._text_fns = [backend.text_encoder_call(i) for i in range(len(model.text_encoders))]
        if acc.kernels:
            acc.handles.append(patch_unet(model.unet))
        vae_opts = options_from_env(vae_mode, kernels=acc.kernels)
        if acc.kernels or acc.cuda_graphs or vae_opts.spec():
            acc.vae_decoder = prepare_decoder(model.vae, vae_opts, graphs=acc.cuda_graphs)
            if acc.vae_decoder.handle is not None:
                acc.handles.append(acc.vae_decoder.handle)
        if acc.cuda_graphs:
            # The decoder's graphs get their own memory pool and capture stream (so their own cuBLAS workspace):
            # the engine replays them on a decode stream while the next UNet step replays on the main one, and
            # two graphs running at once must share neither.
            acc.build_graphs(CudaGraphCapturer(), CudaGraphCapturer())
        return acc

    def build_graphs(self, capturer, decode_capturer=None) -> None:
        """Route the UNet, decoder(+postprocess) and text-encoder calls through graph caches, one graph per
        declared bucket (tests pass a fake capturer). `decode_capturer`: the decoder graphs' own (pool)."""
        buckets = self.buckets
        self.cuda_graphs = True
        self.unet_graphs = GraphCache(self._unet_eager, buckets, "unet", capturer)
        vae_buckets = tuple(b for b in buckets if b <= VAE_MAX_GRAPH_BATCH) or (buckets[0],)
        self.vae_graphs = GraphCache(self._decode_eager, vae_buckets, "vae", decode_capturer or capturer)
        # SDXL's two text encoders took 16.5 ms eager of an 84.8 ms 1024^2 image on an H100 (BENCHMARKS.md).
        self.text_graphs = [GraphCache(fn, buckets, f"text_encoder_{i}", capturer)
                            for i, fn in enumerate(self._text_fns)]

    def patch_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.handles:
            for k, v in h.counts.items():
                out[k] = out.get(k, 0) + v
        return out

    # -- the calls the backend makes ---------------------------------------------------------------
    def _unet_eager(self, latents: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor,
                    *added: torch.Tensor) -> torch.Tensor:
        cond = {"text_embeds": added[0], "time_ids": added[1]} if added else None
        return self._unet(latents, t, encoder_hidden_states=embeds, added_cond_kwargs=cond, return_dict=False)[0]

    def unet(self, latents: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Model output for (B, C, h, w) latents in the UNet's dtype; cond is a backends.base.Conditioning."""
        inputs = [latents, t, cond.embeds]
        if cond.pooled is not None:
            inputs += [cond.pooled, cond.time_ids]
        if self.unet_graphs is not None:
            return self.unet_graphs(*inputs)
        return self._unet_eager(*inputs)

    def text(self, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Text encoder `index` on (B, L) token ids, through its graph cache when graphs are on."""
        if self.text_graphs:
            out = self.text_graphs[index](ids)
            return out if isinstance(out, tuple) else (out,)
        return tuple(self._text_fns[index](ids))

    def _post(self, image: torch.Tensor) -> torch.Tensor:
        return fused_to_uint8(image) if self.kernels else _to_uint8_torch(image)

    def _decode_eager(self, z: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Decoder + postprocess: (B, 4, h, w) scaled-back latents -> (B, H, W, 3) uint8 on the device; with the
        fp16 guard also the (B,) all-finite flags (checked on the host by decode(), outside any graph)."""
        dec = self.vae_decoder
        if dec is None:
            return self._post(self._vae.decode(z, return_dict=False)[0])
        if dec.guarded:
            image, ok = dec.decode_flagged(z)
            return self._post(image), ok
        return self._post(dec(z))

    def decode_device(self, z: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 on the device, on the current stream (the backend's decode stream when overlapping)."""
        out = self.vae_graphs(z) if self.vae_graphs is not None else self._decode_eager(z)
        if self.vae_decoder is not None and self.vae_decoder.guarded:
            out = self.vae_decoder.repair(z, *out, post=self._post)
        return out

    def decode(self, z: torch.Tensor) -> np.ndarray:
        return self.decode_device(z).cpu().numpy()

    def to_uint8_device(self, image: torch.Tensor) -> torch.Tensor:
        return self._post(image)

    def to_uint8(self, image: torch.Tensor) -> np.ndarray:
        return self._post(image).cpu().numpy()

    def warm_up(self, run, sizes: list[tuple[int, int]], buckets: tuple[int, ...] | None = None) -> int:
        """Capture the graphs (and compile the Triton kernels) for every (width, height) x bucket before
        serving, so no request pays for a capture: `run(width, height, batch)` makes one 1-step generation of
        `batch` images. Returns the number of runs."""
        buckets = buckets or self.unet_graphs.buckets
        runs = 0
        for width, height in sizes:
            for b in buckets:
                run(width, height, b)
                runs += 1
        return runs

    def undo(self) -> None:
        if self.vae_decoder is not None:
            self.vae_decoder.undo()
            self.vae_decoder = None
        for h in reversed(self.handles):
            h.undo()
        self.handles.clear()
        self.kernels = False
        self.unet_graphs = self.vae_graphs = self.text_graphs = None
        self.cuda_graphs = False


def _to_uint8_torch(image: torch.Tensor) -> torch.Tensor:
    from .postprocess import to_uint8_ref

    return to_uint8_ref(image)
