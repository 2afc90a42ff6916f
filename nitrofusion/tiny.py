"""Tiny random-weight diffusers folders (SDXL and SD1.x families) built offline, for tests and smoke runs.

Same component classes and folder layout as the real models, a few hundred kilobytes each.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

TINY_VOCAB_WORDS = ["a", "red", "blue", "green", "circle", "square", "cat", "dog", "photo", "of", "the"]


def tiny_tokenizer(max_length: int = 77):
    """A byte-level BPE CLIP tokenizer over a small vocabulary (any text still tokenises, byte by byte)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars + [c + "</w>" for c in chars]:
        vocab[c] = len(vocab)
    merges: list[str] = []
    for word in TINY_VOCAB_WORDS:
        # Merge each word left to right into one token; skip merges already present.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            rule = f"{pieces[0]} {pieces[1]}"
            if rule not in merges:
                merges.append(rule)
                vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=max_length)


def _text_config(tokenizer, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return CLIPTextConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|startoftext|>"), eos_token_id=eos, pad_token_id=eos,
        hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-5, num_attention_heads=4,
        num_hidden_layers=3, vocab_size=len(tokenizer), projection_dim=projection, hidden_act="gelu",
        max_position_embeddings=tokenizer.model_max_length,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[16, 32], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=32,
    )


def tiny_unet(family: str, sample_size: int = 16, te2_width: int = 32):
    from diffusers import UNet2DConditionModel

    common = {
        "block_out_channels": (8, 16), "layers_per_block": 1, "sample_size": sample_size, "in_channels": 4,
        "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 4,
    }
    if family == "sdxl":
        # projection_class_embeddings_input_dim = 6 time ids x addition_time_embed_dim + pooled width
        return UNet2DConditionModel(
            **common, attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
            projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=32 + te2_width,
        )
    return UNet2DConditionModel(**common, attention_head_dim=(2, 4), cross_attention_dim=32)


def tiny_scheduler(shift: int | None = None):
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler config: the noise schedule is what the sampler reads from it.
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    if shift is not None:
        sched.register_to_config(shifted_timestep=shift)
    return sched


def tiny_pipeline(family: str, seed: int = 0, shift: int | None = None, te2_width: int = 32):
    """A diffusers pipeline object with tiny random components (SDXL or SD1.x family). `te2_width`: the second
    SDXL text encoder's width; a single-file checkpoint needs it unlike the first's (48), as in SDXL (768 vs 1280),
    because diffusers tells the two apart by it."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    unet, vae = tiny_unet(family, te2_width=te2_width), _tiny_vae()
    if family == "sdxl":
        te1 = CLIPTextModel(_text_config(tok))
        te2 = CLIPTextModelWithProjection(_text_config(tok, hidden=te2_width))
        return StableDiffusionXLPipeline(
            vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tiny_tokenizer(),
            unet=unet, scheduler=tiny_scheduler(shift), force_zeros_for_empty_prompt=True,
        )
    if family == "sd":
        return StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(_text_config(tok)), tokenizer=tok, unet=unet,
            scheduler=tiny_scheduler(shift), safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    raise ValueError(f"unknown family {family!r}: use sdxl or sd")


def tiny_preview_decoder():
    """A TAESD-shaped AutoencoderTiny matching the tiny VAE's 2x latent scale (real TAESD is 8x)."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1), latent_channels=4, upsampling_scaling_factor=2,
    )


def save_tiny_model(path: str | Path, family: str, seed: int = 0, shift: int | None = None,
                    preview: bool = False, te2_width: int = 32) -> Path:
    """Save a tiny model folder; `preview` adds a `vae_preview/` tiny decoder (used for streamed previews)."""
    path = Path(path)
    tiny_pipeline(family, seed=seed, shift=shift, te2_width=te2_width).save_pretrained(path)
    if preview:
        torch.manual_seed(seed + 1)
        tiny_preview_decoder().save_pretrained(path / "vae_preview")
    return path
