"""PyTorch backend: diffusers' UNet / VAE and transformers' CLIP text encoders on CPU (fp32) or CUDA."""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import NitroError
from ..models import LoadedModel
from ..scheduler import DEFAULT_BUCKETS
from ..transfer import to_device
from .base import Backend, Conditioning, Pending

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """CPU runs fp32 (or bf16); CUDA defaults to fp16. Unavailable devices are a clear error."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise NitroError("--device cuda was asked for, but this machine has no CUDA device (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise NitroError(f"unsupported device {dev.type!r}: use cpu or cuda")
    if dtype is None:
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise NitroError(f"unsupported dtype {dtype!r}: use one of float32, float16, bfloat16")
    if dev.type == "cpu" and DTYPES[dtype] == torch.float16:
        raise NitroError("float16 is not supported on the CPU: use float32 or bfloat16")
    return dev, DTYPES[dtype]


class TorchBackend(Backend):
    """Runs one LoadedModel with diffusers / transformers modules. Rows' latents live on `device`."""

    name = "torch"

    def __init__(self, model: LoadedModel, device: str | None = None, dtype: str | None = None,
                 text_cache_size: int = 1024, kernels: bool | None = None, cuda_graphs: bool | None = None,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, overlap: bool | None = None):
        super().__init__(model, text_cache_size)
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        # The SDXL VAE overflows in fp16: decode in bf16 on CUDA, fp32 on the CPU.
        self.vae_dtype = torch.bfloat16 if self.device.type == "cuda" and self.dtype != torch.float32 else torch.float32
        model.unet.to(self.device, self.dtype)
        for te in model.text_encoders:
            te.to(self.device, self.dtype)
        model.vae.to(self.device, self.vae_dtype)
        if model.preview_vae is not None:
            model.preview_vae.to(self.device, self.vae_dtype)
        self.latent_channels = int(model.unet.config.in_channels)
        self.vae_scale_factor = model.vae_scale_factor
        # Fused Triton kernels and CUDA graphs (one per declared batch bucket), both on by default on CUDA.
        from kernels.accel import Accelerator

        self.accel = Accelerator.for_backend(self, kernels=kernels, cuda_graphs=cuda_graphs, buckets=buckets)
        # On CUDA, decodes run on their own stream so the engine's next UNet step does not wait for them
        # (NITROFUSION_OVERLAP=0 turns it off, for comparison).
        if overlap is None:
            overlap = os.environ.get("NITROFUSION_OVERLAP", "1") != "0"
        self.decode_stream = torch.cuda.Stream(self.device) if overlap and self.device.type == "cuda" else None

    # -- text ----------------------------------------------------------------------------------
    def text_encoder_call(self, index: int):
        """fn(ids) -> (hidden states for the embeddings, first output) for text encoder `index`, as diffusers'
        encode_prompt reads them: SD1.x the last hidden state; SDXL the penultimate layer, and the first output
        (CLIPTextModelWithProjection's pooled text_embeds). Tensors only, so a CUDA graph can replay it."""
        enc = self.model.text_encoders[index]
        if self.model.family == "sd":
            return lambda ids: (enc(ids)[0],)

        def run(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = enc(ids, output_hidden_states=True)
            return out.hidden_states[-2], out[0]

        return run

    @torch.inference_mode()
    def run_text_encoder(self, index: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.accel.text(index, to_device(ids, self.device))
        pooled = out[1] if len(out) > 1 and out[1].ndim == 2 else None  # CLIPTextModelWithProjection: text_embeds
        return out[0], pooled

    # -- denoiser ------------------------------------------------------------------------------
    @torch.inference_mode()
    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        t = to_device(torch.tensor(timesteps, dtype=torch.long), self.device)  # (B,) one timestep per row
        x = latents.to(self.device, self.dtype)
        if self.accel.active:
            return self.accel.unet(x, t, cond).float()
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        out = self.model.unet(x, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]
        return out.float()

    def sampler_step(self, sampler, sample, model_output, timesteps, next_levels, noise):
        """On CUDA with kernels on, the fused Triton step (bit-identical to LCMSampler.step, one launch)."""
        if self.accel.kernels and sample.is_cuda:
            from kernels.sampler_step import lcm_step

            x0, x_next = lcm_step(sampler, sample, model_output, timesteps, next_levels, noise)
            return x0, x_next
        return sampler.step(sample, model_output, timesteps, next_levels, noise)

    # -- images --------------------------------------------------------------------------------
    def _full_device(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents -> (B, H, W, 3) uint8 on the device, with the full VAE decoder."""
        z = z.to(self.device, self.vae_dtype)
        if self.accel.active:
            return self.accel.decode_device(z)
        return to_uint8_tensor(self.model.vae.decode(z, return_dict=False)[0])

    def _fast_device(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler latents -> (B, H, W, 3) uint8 on the device, with the tiny decoder (vae_preview/)."""
        image = self.model.preview_vae.decode(latents.to(self.device, self.vae_dtype), return_dict=False)[0]
        return self.accel.to_uint8_device(image) if self.accel.active else to_uint8_tensor(image)

    @torch.inference_mode()
    def decode_unscaled(self, z: torch.Tensor) -> np.ndarray:
        return self._full_device(z).cpu().numpy()

    @property
    def has_fast_decoder(self) -> bool:
        return self.model.preview_vae is not None

    @torch.inference_mode()
    def decode_fast(self, latents: torch.Tensor) -> np.ndarray:
        return self._fast_device(latents).cpu().numpy()

    @torch.inference_mode()
    def decode_async(self, latents: torch.Tensor, decoder: str, preview: bool = False) -> Pending:
        """On CUDA: the decode and its copy to pinned host memory run on the decode stream, after the step that
        made `latents`, while the engine goes on to launch the next UNet step on the main stream."""
        if self.decode_stream is None:
            return super().decode_async(latents, decoder, preview)
        fast = self.has_fast_decoder if preview else decoder == "fast"
        self.decode_stream.wait_stream(torch.cuda.current_stream(self.device))
        # The main stream made these latents and may reuse their memory once Python drops them: keep the
        # block until the decode stream's work queued so far is done.
        latents.record_stream(self.decode_stream)
        with torch.cuda.stream(self.decode_stream):
            images = self._fast_device(latents) if fast else self._full_device(self.unscale(latents.float()))
            return Pending(images)

    def warm_up(self, run, sizes, buckets) -> int:
        """Capture the CUDA graphs for every size x bucket before serving (no request pays for a capture)."""
        return self.accel.warm_up(run, sizes, buckets) if self.accel.cuda_graphs else 0


def to_uint8_tensor(image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 on the image's device, the same arithmetic as diffusers'
    postprocess (kernels/postprocess.py fuses it into one pass on CUDA)."""
    image = (image.float() * 0.5 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    return to_uint8_tensor(image).cpu().numpy()
