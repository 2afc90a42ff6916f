"""Write a diffusers model's weights as one single-file checkpoint in the original (LDM / A1111 / ComfyUI) layout.

The reverse of diffusers' `from_single_file` conversion (diffusers.loaders.single_file_utils), general in the
number of blocks and layers per block so that the tiny test models fit it. The real checkpoints' key names:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (SD1.x CLIP-L),
`conditioner.embedders.0.transformer.*` / `conditioner.embedders.1.model.*` (SDXL CLIP-L / OpenCLIP bigG).
"""

from __future__ import annotations

from pathlib import Path

import torch

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def _resnet(rest: str) -> str:
    for new, old in _RESNET:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise KeyError(rest)


def unet_to_ldm(sd: dict, layers_per_block: int) -> dict:
    per = layers_per_block + 1
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    attn_up = {int(k.split(".")[1]) * per + int(k.split(".")[3]) for k in sd if k.startswith("up_blocks.")
               and ".attentions." in k}
    out = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        p = head.split(".")
        if head in fixed:
            new = f"{fixed[head]}.{leaf}"
        elif p[0] == "down_blocks":
            b = int(p[1])
            if p[2] == "downsamplers":
                new = f"input_blocks.{1 + b * per + layers_per_block}.0.op.{leaf}"
            elif p[2] == "resnets":
                new = f"input_blocks.{1 + b * per + int(p[3])}.0.{_resnet('.'.join(p[4:]) + '.' + leaf)}"
            else:
                new = f"input_blocks.{1 + b * per + int(p[3])}.1.{'.'.join(p[4:] + [leaf])}"
        elif p[0] == "mid_block":
            i = 1 if p[1] == "attentions" else 2 * int(p[2])
            rest = ".".join(p[3:] + [leaf])
            new = f"middle_block.{i}.{_resnet(rest) if p[1] == 'resnets' else rest}"
        elif p[0] == "up_blocks":
            b = int(p[1])
            if p[2] == "upsamplers":
                i = b * per + layers_per_block
                new = f"output_blocks.{i}.{2 if i in attn_up else 1}.conv.{leaf}"
            elif p[2] == "resnets":
                new = f"output_blocks.{b * per + int(p[3])}.0.{_resnet('.'.join(p[4:]) + '.' + leaf)}"
            else:
                new = f"output_blocks.{b * per + int(p[3])}.1.{'.'.join(p[4:] + [leaf])}"
        else:
            raise KeyError(key)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_ldm(sd: dict, num_blocks: int) -> dict:
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        head, _, leaf = key.rpartition(".")
        p = head.split(".")
        side = p[0]  # encoder | decoder | quant_conv | post_quant_conv
        if side in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
            new = key
        elif p[1] == "conv_norm_out":
            new = f"{side}.norm_out.{leaf}"
        elif p[1] == "mid_block":
            if p[2] == "attentions":
                new = f"{side}.mid.attn_1.{attn['.'.join(p[4:])]}.{leaf}"
                if value.ndim == 2:
                    value = value[:, :, None, None]  # linear -> 1x1 conv, as the original stores them
            else:
                new = f"{side}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}.{leaf}"
        else:
            b = int(p[2]) if side == "encoder" else num_blocks - 1 - int(p[2])
            level = "down" if side == "encoder" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{side}.{level}.{b}.{level}sample.conv.{leaf}"
            else:
                rest = ".".join(p[5:]).replace("conv_shortcut", "nin_shortcut")
                new = f"{side}.{level}.{b}.block.{p[4]}.{rest}.{leaf}"
        out["first_stage_model." + new] = value
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """OpenAI CLIP-L, kept in transformers' names under `prefix` (with the text_model. level the originals have)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def open_clip_to_ldm(sd: dict, prefix: str = "conditioner.embedders.1.model.") -> dict:
    """OpenCLIP bigG as SDXL stores it: fused q/k/v, resblocks, a transposed text_projection."""
    names = {"embeddings.position_embedding.weight": "positional_embedding",
             "embeddings.token_embedding.weight": "token_embedding.weight",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    sub = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
           ("self_attn.out_proj", "attn.out_proj")]
    out = {prefix + "text_projection": sd["text_projection.weight"].T.contiguous()}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        k = key.removeprefix("text_model.")
        if k in names:
            out[prefix + names[k]] = value
        elif k.startswith("encoder.layers."):
            layer, rest = k.removeprefix("encoder.layers.").split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[1]
                qkv.setdefault(f"{layer}.{kind}", {})[rest.split(".")[1]] = value
                continue
            for new, old in sub:
                rest = rest.replace(new, old)
            out[f"{prefix}transformer.resblocks.{layer}.{rest}"] = value
        elif key != "text_projection.weight":
            raise KeyError(key)
    for name, parts in qkv.items():
        layer, kind = name.split(".")
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return out


def write_single_file(pipe, path: Path) -> Path:
    """Save a diffusers StableDiffusion(XL)Pipeline's weights as one original-layout .safetensors checkpoint."""
    from safetensors.torch import save_file

    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state |= vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels))
    if getattr(pipe, "text_encoder_2", None) is not None:
        state |= clip_to_ldm(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer.")
        state |= open_clip_to_ldm(pipe.text_encoder_2.state_dict())
    else:
        state |= clip_to_ldm(pipe.text_encoder.state_dict(), "cond_stage_model.transformer.")
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return Path(path)
