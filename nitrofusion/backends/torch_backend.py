"""PyTorch backend: diffusers' UNet / VAE and transformers' CLIP text encoders on CPU (fp32) or CUDA."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import NitroError
from ..models import LoadedModel
from .base import Conditioning, PromptCache

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


class TorchBackend:
    """Runs one LoadedModel. Not thread-safe: one thread (the engine's) owns it."""

    name = "torch"

    def __init__(self, model: LoadedModel, device: str | None = None, dtype: str | None = None,
                 text_cache_size: int = 1024, kernels: bool | None = None, cuda_graphs: bool | None = None):
        self.model = model
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
        self._text_cache = PromptCache(text_cache_size)
        # Fused Triton kernels and CUDA graphs, both on by default on CUDA: kernels/accel.py.
        from kernels.accel import Accelerator

        self.accel = Accelerator.for_backend(self, kernels=kernels, cuda_graphs=cuda_graphs)

    # -- text ----------------------------------------------------------------------------------
    def count_tokens(self, prompt: str) -> int:
        return max(len(tok(prompt).input_ids) for tok in self.model.tokenizers)

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
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Both encoders' hidden states concatenated, and the pooled projection of SDXL's second."""
        embeds, pooled = [], None
        for i, tok in enumerate(self.model.tokenizers):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = self.accel.text(i, ids)
            embeds.append(out[0])
            if len(out) > 1 and out[1].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = out[1]
        return torch.cat(embeds, dim=-1), pooled

    def encode_text(self, prompts: list[str], sizes: list[tuple[int, int]]) -> Conditioning:
        emb, pooled = self._text_cache.get(prompts, self._encode_uncached)
        return Conditioning.from_text(emb, pooled, sizes, self.model.family)

    # -- denoiser ------------------------------------------------------------------------------
    @torch.inference_mode()
    def unet(self, latents: torch.Tensor, timesteps: list[int], cond: Conditioning) -> torch.Tensor:
        t = torch.tensor(timesteps, dtype=torch.long, device=self.device)  # (B,) one timestep per row
        added = None
        if cond.pooled is not None:
            added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        if self.accel.active:
            return self.accel.unet(latents.to(self.device, self.dtype), t, cond).float()
        out = self.model.unet(
            latents.to(self.device, self.dtype), t, encoder_hidden_states=cond.embeds,
            added_cond_kwargs=added, return_dict=False,
        )[0]
        return out.float()

    # -- images --------------------------------------------------------------------------------
    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        cfg = self.model.vae.config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is not None and std is not None:
            c = latents.shape[1]
            mean_t = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
            std_t = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(1, c, 1, 1)
            return latents * std_t / cfg.scaling_factor + mean_t
        return latents / cfg.scaling_factor

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        z = self._unscale(latents.to(self.device, torch.float32)).to(self.vae_dtype)
        if self.accel.active:
            return self.accel.decode(z)
        image = self.model.vae.decode(z, return_dict=False)[0]
        return to_uint8(image)

    @torch.inference_mode()
    def preview(self, latents: torch.Tensor) -> np.ndarray:
        """A quick look at predicted x0: the tiny decoder when the model has one, else the full VAE."""
        if self.model.preview_vae is None:
            return self.decode(latents)
        image = self.model.preview_vae.decode(latents.to(self.device, self.vae_dtype), return_dict=False)[0]
        return self.accel.to_uint8(image) if self.accel.active else to_uint8(image)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, the same arithmetic as diffusers' postprocess."""
    image = (image.float() * 0.5 + 0.5).clamp(0, 1)
    return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
