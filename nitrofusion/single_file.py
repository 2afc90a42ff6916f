"""Single-file checkpoints in the original SD1.x / SDXL layout (what AUTOMATIC1111 and ComfyUI load, e.g. NitroSD's
`nitrosd-realism_comfyui.safetensors`), loaded offline with diffusers' `from_single_file`.

A single file holds weights only. The architecture comes from a config folder: the public SDXL-base and SD1.5
configs shipped in `configs/` (picked from the checkpoint's keys), or `--config` (any diffusers folder or cached
repo id). A file with the UNet alone (what ComfyUI keeps in models/unet) takes its text encoders and VAE from the
base model's diffusers folder: `--config`, else SDXL base / SD1.5 when they are in the Hugging Face cache. The CLIP tokenizer files are derived from the CLIP BPE merges shipped in `configs/clip/merges.txt.gz`
(OpenAI CLIP, MIT; the same vocabulary serves SD1.5's tokenizer and both of SDXL's, which differ only in their
pad token), so nothing is fetched. The timestep shift is not in the file: it comes from `--shift`.
"""

from __future__ import annotations

import functools
import gzip
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .errors import ModelLoadError

CONFIG_ROOT = Path(__file__).resolve().parent / "configs"
SHIPPED_CONFIGS = {"sdxl": CONFIG_ROOT / "sdxl-base", "sd": CONFIG_ROOT / "sd15"}
CLIP_MERGES = CONFIG_ROOT / "clip" / "merges.txt.gz"

UNET_PREFIX = "model.diffusion_model."
# One key each that only that layout has (as diffusers' single_file_utils tells them apart).
SDXL_KEY = "conditioner.embedders.1.model.positional_embedding"  # OpenCLIP bigG, the second SDXL text encoder
SDXL_REFINER_KEY = "conditioner.embedders.0.model.text_projection"
SD1_PREFIX = "cond_stage_model.transformer."  # OpenAI CLIP-L
SD2_PREFIX = "cond_stage_model.model."  # OpenCLIP-H
SDXL_UNET_KEY = UNET_PREFIX + "label_emb.0.0.weight"  # SDXL's UNet takes pooled text + size ids; SD1.x's has none
VAE_PREFIXES = ("first_stage_model.", "vae.")
TEXT_PREFIXES = ("cond_stage_model.", "conditioner.")
FAMILY_NAMES = {"sdxl": "SDXL", "sd": "SD1.x"}
# Where a UNet-only file's text encoders and VAE come from without --config, when cached.
DEFAULT_BASES = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0", "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def read_keys(path: Path) -> dict[str, list[int]]:
    """The tensor names and shapes of a .safetensors file, from its header alone (cheap for a 7 GB file);
    a truncated or damaged file is a ModelLoadError."""
    from safetensors import SafetensorError, safe_open

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"its header claims {header_len} bytes and the file has {size}")
            header = json.loads(f.read(header_len))
        # safetensors checks the header too, but reading the tensors' end offset here names the shortfall.
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + header_len + end != size:
            raise ValueError(f"its tensors need {8 + header_len + end} bytes and the file has {size}")
        with safe_open(str(path), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is not a readable .safetensors checkpoint ({e}): a truncated or damaged "
                             "download? Fetch the file again") from None


def checkpoint_family(keys: dict, path: Path) -> str:
    """"sdxl" or "sd" from the checkpoint's keys (its text encoders, else its UNet)."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if "conv_in.weight" in keys and any(k.startswith("down_blocks.") for k in keys):
            raise ModelLoadError(
                f"{path} is a UNet alone in the diffusers layout, not a full checkpoint: pass it as --unet, with "
                "--model the base it was trained from (SDXL base for NitroSD's *_unet.safetensors)"
            )
        raise ModelLoadError(f"{path} has no UNet weights in the original layout ({UNET_PREFIX}*): it is not an "
                             "SD1.x / SDXL single-file checkpoint")
    if SDXL_KEY in keys:
        return "sdxl"
    if SDXL_REFINER_KEY in keys:
        raise ModelLoadError(f"{path} is an SDXL refiner checkpoint (image-to-image only): use an SDXL base one")
    if any(k.startswith(SD1_PREFIX) for k in keys):
        return "sd"
    if any(k.startswith(SD2_PREFIX) for k in keys):
        raise ModelLoadError(f"{path} is an SD 2.x checkpoint: single files are read for SD1.x and SDXL; use a "
                             "diffusers folder for SD 2.x")
    return "sdxl" if SDXL_UNET_KEY in keys else "sd"


def missing_parts(keys: dict) -> list[str]:
    """The components a checkpoint lacks: "vae", "text_encoders" (a UNet-only file lacks both)."""
    missing = []
    if not any(k.startswith(VAE_PREFIXES) for k in keys):
        missing.append("vae")
    if not any(k.startswith(TEXT_PREFIXES) for k in keys):
        missing.append("text_encoders")
    return missing


def config_family(config: Path) -> str:
    from .models import SD_PIPELINES, SDXL_PIPELINES

    try:
        name = json.loads((config / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"config folder {config} has no readable model_index.json ({e})") from None
    if name in SDXL_PIPELINES:
        return "sdxl"
    if name in SD_PIPELINES:
        return "sd"
    raise ModelLoadError(f"config folder {config} describes a {name!r}: single files are read for SD1.x and SDXL")


def config_for(path: Path, config: Path | None) -> Path:
    """The config folder for checkpoint `path`: `config` (checked against the checkpoint), else the shipped one;
    for a file without text encoders or VAE, the cached base model that has them."""
    from .sources import fetch_hint, resolve_config

    keys = read_keys(path)
    family = checkpoint_family(keys, path)
    if config is not None:
        wanted = config_family(config)
        if family != wanted:
            raise ModelLoadError(f"{path} is an {FAMILY_NAMES[family]} checkpoint but --config {config} describes "
                                 f"{FAMILY_NAMES[wanted]}")
        return config
    missing = missing_parts(keys)
    if not missing:
        return SHIPPED_CONFIGS[family]
    base = DEFAULT_BASES[family]
    try:
        return resolve_config(base)
    except ModelLoadError:
        raise ModelLoadError(
            f"{path} holds no {' and no '.join(m.replace('_', ' ') for m in missing)} (a UNet-only file, as ComfyUI "
            f"keeps in models/unet): they come from its base model: pass --config DIR|ORG/NAME, or {base} is used "
            f"once cached ({fetch_hint(base, None)})"
        ) from None


@functools.cache
def _clip_vocab() -> tuple[str, str]:
    """(vocab.json, merges.txt) text of the CLIP tokenizer: the vocabulary is the 256 byte symbols, the same with
    the end-of-word mark, one token per merge rule in order, then the start and end tokens (49408 in all)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    merges_txt = gzip.decompress(CLIP_MERGES.read_bytes()).decode("utf-8")
    rules = [ln for ln in merges_txt.splitlines()[1:] if ln]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [r.replace(" ", "") for r in rules]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), merges_txt


def load_tokenizer(folder: Path) -> Any:
    """A CLIPTokenizer from a tokenizer folder; one with only its settings (the shipped ones) gets the CLIP
    vocabulary written beside them in a temporary folder first."""
    from transformers import CLIPTokenizer

    try:
        if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
            return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        vocab, merges = _clip_vocab()
        with tempfile.TemporaryDirectory(prefix="nitro-tokenizer-") as tmp:
            for f in folder.glob("*.json"):
                shutil.copy(f, tmp)
            (Path(tmp) / "vocab.json").write_text(vocab, encoding="utf-8")
            (Path(tmp) / "merges.txt").write_text(merges, encoding="utf-8")
            return CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {e}") from None


def load_single_file(path: Path, config: Path) -> tuple[str, dict, dict]:
    """(family, {"unet", "vae", "text_encoders", "tokenizers"}, scheduler config) of checkpoint `path`."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    from .models import _load_component

    family = config_family(config)
    names = ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]
    tokenizers = [load_tokenizer(config / n) for n in names]
    kwargs: dict[str, Any] = dict(zip(names, tokenizers))
    missing = missing_parts(read_keys(path))
    if "vae" in missing:  # from the base model's folder, as a folder loads it (fp16 variant included)
        from diffusers import AutoencoderKL

        kwargs["vae"] = _load_component(AutoencoderKL, config, "vae")
    if "text_encoders" in missing:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        kwargs["text_encoder"] = _load_component(CLIPTextModel, config, "text_encoder")
        if family == "sdxl":
            kwargs["text_encoder_2"] = _load_component(CLIPTextModelWithProjection, config, "text_encoder_2")
    if family == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    try:
        # fp32 as a folder loads; the backend casts to its dtype. config= a local folder: nothing is fetched.
        pipe = cls.from_single_file(str(path), config=str(config), local_files_only=True, torch_dtype=torch.float32,
                                    **kwargs)
    except SingleFileComponentError as e:
        raise ModelLoadError(f"{path} lacks weights that {config} does not hold either: "
                             f"{str(e).splitlines()[0]} (pass --config a diffusers folder with them)") from None
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ModelLoadError(f"cannot load single-file checkpoint {path} with the configs in {config}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (if its architecture "
                             "differs from these, pass --config its base model's diffusers folder)") from None
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if family == "sdxl" else [pipe.text_encoder]
    try:
        scheduler_config = json.loads((config / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"config folder {config} has no readable scheduler/scheduler_config.json ({e})") from None
    parts = {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": encoders, "tokenizers": tokenizers}
    return family, parts, scheduler_config
