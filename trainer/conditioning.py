"""Text conditioning as the trainer passes it around: `nitrofusion.backends.base.Conditioning` (the inference
side's one type), embeddings only for SD1.x-style UNets, plus the pooled embedding and the size/crop time ids for
SDXL (`addition_embed_type="text_time"`). Every UNet call in the trainer goes through `unet_kwargs`, so a model
that needs the SDXL extras gets them in the teacher sampler, the student and the discriminator's frozen encoder.
"""

from __future__ import annotations

import torch

from nitrofusion.backends.base import Conditioning

__all__ = ["Conditioning", "SDXLTextEncoder", "expand", "rows", "to", "unet_kwargs", "zero_conditioning"]


def unet_kwargs(cond: Conditioning) -> dict:
    """Keyword arguments for `UNet2DConditionModel.__call__`."""
    if cond.pooled is None:
        return {"encoder_hidden_states": cond.embeds}
    return {"encoder_hidden_states": cond.embeds,
            "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}


def _map(cond: Conditioning, fn) -> Conditioning:
    return Conditioning(fn(cond.embeds), None if cond.pooled is None else fn(cond.pooled),
                        None if cond.time_ids is None else fn(cond.time_ids))


def rows(cond: Conditioning, index: slice) -> Conditioning:
    return _map(cond, lambda t: t[index])


def expand(cond: Conditioning, b: int) -> Conditioning:
    """A one-row conditioning (the empty prompt's) as b rows, without copying."""
    return _map(cond, lambda t: t.expand(b, *t.shape[1:]))


def to(cond: Conditioning, device=None, dtype: torch.dtype | None = None) -> Conditioning:
    return _map(cond, lambda t: t.to(device=device, dtype=dtype))


def zero_conditioning(unet_config, batch: int = 1, ctx_len: int = 1, size: int = 64,
                      device=None) -> Conditioning:
    """All-zero conditioning shaped for a UNet config (a dry run's input; SDXL's empty prompt is zeros too)."""
    dim = unet_config.cross_attention_dim
    embeds = torch.zeros(batch, ctx_len, dim, device=device)
    if getattr(unet_config, "addition_embed_type", None) != "text_time":
        return Conditioning(embeds)
    # projection_class_embeddings_input_dim = pooled width + 6 time ids x addition_time_embed_dim
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    return Conditioning(embeds, torch.zeros(batch, pooled, device=device),
                        torch.tensor([[size, size, 0, 0, size, size]] * batch, dtype=torch.float32, device=device))


class SDXLTextEncoder:
    """SDXL's prompt encoding, as StableDiffusionXLPipeline does it: both encoders' penultimate hidden states
    concatenated (B, 77, 768 + 1280), the second encoder's projected pooled output (B, 1280), and the
    micro-conditioning time ids (original size, crop (0, 0), target size) for the training resolution. The empty
    prompt is all zeros (SDXL base's `force_zeros_for_empty_prompt`): that is the unconditional heads' input."""

    def __init__(self, tokenizers, encoders, image_size: int, device, zero_empty: bool = True,
                 max_cached: int | None = None):
        self.tokenizers, self.encoders, self.device = tokenizers, encoders, device
        self.image_size, self.zero_empty, self.max_cached = image_size, zero_empty, max_cached
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> None:
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            embeds.append(out.hidden_states[-2].float())
            if hasattr(out, "text_embeds"):  # CLIPTextModelWithProjection
                pooled = out.text_embeds.float()
        emb = torch.cat(embeds, dim=-1)
        for i, p in enumerate(prompts):
            e, q = emb[i], pooled[i]
            if p == "" and self.zero_empty:
                e, q = torch.zeros_like(e), torch.zeros_like(q)
            self._cache[p] = (e, q)

    def __call__(self, prompts: list[str]) -> Conditioning:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            self._encode(missing)
        s = self.image_size
        emb = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        while self.max_cached is not None and len(self._cache) > self.max_cached:  # oldest first
            self._cache.pop(next(iter(self._cache)))
        return Conditioning.from_text(emb, pooled, [(s, s)] * len(prompts), "sdxl")
