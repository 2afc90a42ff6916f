"""The graphs that get exported: thin torch modules around each component with plain tensor IO, their
input/output names and dynamic axes, and sample inputs to trace and check them with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nitrofusion.models import LoadedModel


class TextEncoderGraph(torch.nn.Module):
    """input_ids (B, 77) -> the embeddings the UNet reads, as diffusers' encode_prompt picks them:
    SD1.x the last hidden state; SDXL the penultimate layer, plus the pooled projection of encoder 2."""

    def __init__(self, encoder: Any, family: str, pooled: bool):
        super().__init__()
        self.encoder, self.family, self.pooled = encoder, family, pooled

    def forward(self, input_ids: torch.Tensor):
        if self.family == "sd":
            return self.encoder(input_ids)[0]  # (B, L, D)
        out = self.encoder(input_ids, output_hidden_states=True)
        if self.pooled:
            return out.hidden_states[-2], out[0]  # (B, L, D), (B, P)
        return out.hidden_states[-2]


class UNetGraph(torch.nn.Module):
    """(latents, one int64 timestep per row, text embeddings[, pooled, time ids]) -> eps."""

    def __init__(self, unet: Any, sdxl: bool):
        super().__init__()
        self.unet, self.sdxl = unet, sdxl

    def forward(self, latents, timesteps, embeds, pooled=None, time_ids=None):
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.sdxl else None
        return self.unet(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                         return_dict=False)[0]  # (B, C, h, w)


class DecoderGraph(torch.nn.Module):
    """Unscaled latents -> image in [-1, 1]; the scaling stays in the backend, as in the torch backend."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]  # (B, 3, H, W)


@dataclass
class ComponentSpec:
    name: str
    module: torch.nn.Module
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    samples: list[tuple[torch.Tensor, ...]]  # [0] is traced; all are checked (other batch and sizes)
    fp16_ok: bool = True  # False: the fp16 variant keeps this graph in fp32


def _latent_sides(model: LoadedModel) -> tuple[int, int]:
    """A small traced latent side (a multiple of 8, so every UNet level divides) and a second, other side."""
    native = model.native_size // model.vae_scale_factor
    side = max(8, native // 2 // 8 * 8)
    return side, side + 8


def component_specs(model: LoadedModel, seed: int = 0) -> list[ComponentSpec]:
    g = torch.Generator("cpu").manual_seed(seed)
    sdxl = model.family == "sdxl"
    specs: list[ComponentSpec] = []

    # 1. text encoders: token ids in, embeddings out; only the batch axis varies (77 tokens, padded)
    for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
        name = "text_encoder" if i == 0 else f"text_encoder_{i + 1}"
        pooled = sdxl and i == 1
        vocab = int(enc.config.vocab_size)
        samples = [torch.randint(0, vocab, (b, int(tok.model_max_length)), generator=g) for b in (2, 3)]
        outs = ["hidden", "pooled"] if pooled else ["hidden"]
        specs.append(ComponentSpec(
            name, TextEncoderGraph(enc, model.family, pooled), ["input_ids"], outs,
            {"input_ids": {0: "B"}, **{o: {0: "B"} for o in outs}}, [(s,) for s in samples],
        ))

    # 2. UNet: batch and latent height/width all dynamic (requests pick their own size)
    c = int(model.unet.config.in_channels)
    width = sum(int(te.config.hidden_size) for te in model.text_encoders)
    seq = int(model.tokenizers[0].model_max_length)
    a, b = _latent_sides(model)
    unet_samples = []
    for batch, (h, w) in ((2, (a, a)), (3, (b, a))):
        x = (torch.randn(batch, c, h, w, generator=g), torch.randint(0, 1000, (batch,), generator=g),
             torch.randn(batch, seq, width, generator=g))
        if sdxl:
            pooled_dim = int(model.text_encoders[1].config.projection_dim)
            px_h, px_w = h * model.vae_scale_factor, w * model.vae_scale_factor
            ids = torch.tensor([[px_h, px_w, 0, 0, px_h, px_w]] * batch, dtype=torch.float32)
            x = x + (torch.randn(batch, pooled_dim, generator=g), ids)
        unet_samples.append(x)
    names = ["latents", "timesteps", "embeds"] + (["pooled", "time_ids"] if sdxl else [])
    axes = {n: {0: "B"} for n in names} | {"latents": {0: "B", 2: "h", 3: "w"}, "eps": {0: "B", 2: "h", 3: "w"}}
    specs.append(ComponentSpec("unet", UNetGraph(model.unet, sdxl), names, ["eps"], axes, unet_samples))

    # 3. decoders; the SDXL VAE overflows in fp16, so the fp16 variant keeps the full decoder in fp32
    lc = int(model.vae.config.latent_channels)
    dec_samples = [(torch.randn(2, lc, a, a, generator=g),), (torch.randn(3, lc, b, a, generator=g),)]
    dec_axes = {"latents": {0: "B", 2: "h", 3: "w"}, "image": {0: "B", 2: "H", 3: "W"}}
    specs.append(ComponentSpec("vae_decoder", DecoderGraph(model.vae), ["latents"], ["image"], dec_axes,
                               dec_samples, fp16_ok=False))
    if model.preview_vae is not None:
        specs.append(ComponentSpec("vae_preview", DecoderGraph(model.preview_vae), ["latents"], ["image"],
                                   dec_axes, dec_samples))
    return specs
