"""Builders for the recipe's components: tokenizer, CLIP text encoder, AutoencoderKL, UNet, noise schedule.

All are ordinary diffusers / transformers classes, so every stage's output is a folder `from_pretrained` reads.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .config import AutoencoderConfig, TextConfig, UNetConfig
from .shapes import grammar_words

# SDXL's training noise schedule (scaled_linear, 1000 steps); the sampler reads it back from scheduler configs.
NOISE_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                  "num_train_timesteps": 1000}


def build_tokenizer(max_length: int):
    """Byte-level BPE CLIP tokenizer whose merges spell each grammar word as one token (as nitrofusion.tiny)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    merges: list[str] = []

    def make():
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "vocab.json").write_text(json.dumps(vocab))
            (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
            return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"),
                                 model_max_length=max_length)

    def chain(pieces: list[str]) -> None:
        """Merge rules that join `pieces` left to right into one token."""
        while len(pieces) > 1:
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]

    words = grammar_words()
    for word in words:
        chain(list(word[:-1]) + [word[-1] + "</w>"])
    # BPE applies the lowest-ranked merge first, so one word's rules can split another's; chain the pieces
    # such words end up in until every grammar word is a single token.
    for _ in range(10):
        tok = make()
        broken = [pieces for w in words if len(pieces := tok.tokenize(w)) > 1]
        if not broken:
            break
        for pieces in broken:
            chain(pieces)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return make()


def build_text_encoder(cfg: TextConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextModel(CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_heads,
        num_hidden_layers=cfg.num_layers, vocab_size=len(tokenizer), max_position_embeddings=cfg.max_length,
        projection_dim=cfg.hidden_size, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    ))


def build_vae(cfg: AutoencoderConfig, image_size: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
        block_out_channels=list(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        down_block_types=["DownEncoderBlock2D"] * len(cfg.block_out_channels),
        up_block_types=["UpDecoderBlock2D"] * len(cfg.block_out_channels),
        norm_num_groups=cfg.norm_num_groups, sample_size=image_size, mid_block_add_attention=cfg.mid_attention,
    )
    # Start near-deterministic: with logvar ~ 0 the sampled latent is mean + N(0, 1) and the decoder sees mostly
    # noise until the tiny KL weight lets logvar fall, which took hundreds of steps (measured: the background
    # colour was still wrong after 200). SD's own VAE ends with a tiny posterior std; begin there.
    with torch.no_grad():
        vae.quant_conv.bias[cfg.latent_channels:] = -8.0
    return vae


def build_unet(cfg: UNetConfig, latent_size: int, cross_attention_dim: int, latent_channels: int):
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.cross_attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.cross_attn))
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=cfg.norm_num_groups,
        attention_head_dim=cfg.attention_head_dim, cross_attention_dim=cross_attention_dim,
    )


def train_scheduler(schedule: dict | None = None):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**(schedule or NOISE_SCHEDULE), prediction_type="epsilon")


def alphas_cumprod(schedule: dict | None = None) -> torch.Tensor:
    """(T,) from a noise schedule (beta_* keys of a scheduler config); default SDXL's, the shapes recipe's."""
    return train_scheduler(schedule).alphas_cumprod.to(torch.float32)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0) with per-row t: sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a = abar.to(x0.device)[t].view(-1, 1, 1, 1).to(x0.dtype)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """add_noise's inverse given the noise: (x_t - sqrt(1 - abar) eps) / sqrt(abar), per-row t."""
    a = abar.to(x_t.device)[t].view(-1, 1, 1, 1).to(x_t.dtype)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class TextEncoderWrapper:
    """Tokenise + encode like the inference backend's SD1.x path: last hidden state, padded to max length.
    Returns a `Conditioning` with the embeddings only (SDXL's pooled + time ids: conditioning.SDXLTextEncoder)."""

    def __init__(self, tokenizer, encoder, device, max_cached: int | None = None):
        self.tokenizer, self.encoder, self.device = tokenizer, encoder, device
        # Per-prompt embeddings: unbounded for the shapes grammar (a few thousand prompts); a --from run bounds it.
        self._cache: dict[str, torch.Tensor] = {}
        self.max_cached = max_cached

    @torch.no_grad()
    def __call__(self, prompts: list[str]):
        from .conditioning import Conditioning

        missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids.to(self.device)
            out = self.encoder(ids)[0].float()  # (B, L, D)
            for p, e in zip(missing, out):
                self._cache[p] = e
        emb = torch.stack([self._cache[p] for p in prompts])  # (B, L, D)
        evict(self._cache, self.max_cached)
        return Conditioning(emb)


def evict(cache: dict, limit: int | None) -> None:
    """Drop the oldest entries past `limit` (None: keep all)."""
    while limit is not None and len(cache) > limit:
        cache.pop(next(iter(cache)))
