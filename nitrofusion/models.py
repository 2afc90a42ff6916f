"""Load a model (SDXL or SD1.x family) into its components: a diffusers folder, a cached Hugging Face repo, or a
single-file checkpoint (nitrofusion/sources.py says which forms `--model` takes, single_file.py reads the last).

NitroSD-Realism / -Vibrant ship as a bare UNet state dict on top of SDXL base, so `unet_file` swaps one in.
Every failure becomes a `ModelLoadError` whose message says what is missing and what to do.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .sampler import DEFAULT_SHIFT
from .sources import ModelSource, fetch_hint, resolve_model, resolve_unet

log = logging.getLogger(__name__)

SDXL_PIPELINES = {"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"}
SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"}
# The key the official NitroFusion recipe registers on its scheduler.
SHIFT_KEY = "shifted_timestep"


@dataclass
class LoadedModel:
    """Components of one text-to-image model plus what the sampler and request limits need."""

    path: Path
    family: str  # "sdxl" | "sd"
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    scheduler_config: dict
    shift: int
    preview_vae: Any = None  # optional tiny decoder for previews (AutoencoderTiny in `vae_preview/`)
    extras: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_size(self) -> int:
        """The side length in pixels the UNet was configured for (1024 for SDXL, 512 for SD1.5)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return int(size) * self.vae_scale_factor

    @property
    def max_prompt_tokens(self) -> int:
        return min(int(t.model_max_length) for t in self.tokenizers)

    @property
    def name(self) -> str:
        return self.extras.get("name") or self.path.name


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{what} is not valid JSON: {path} ({e})") from None


def _load_component(cls: Any, folder: Path, subfolder: str, **kwargs: Any) -> Any:
    """from_pretrained with offline-only loading and a clear error for a missing or broken component."""
    sub = folder / subfolder
    if not sub.is_dir():
        raise ModelLoadError(
            f"model folder {folder} has no '{subfolder}' component (expected the folder {sub}); "
            "a complete diffusers model folder has one folder per component listed in model_index.json"
        )
    try:
        return cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True, **kwargs)
    except (OSError, ValueError) as first:
        # SDXL base as published keeps fp16 weights as a variant; try it before giving up.
        if "variant" not in kwargs:
            try:
                return cls.from_pretrained(
                    folder, subfolder=subfolder, local_files_only=True, variant="fp16", **kwargs
                )
            except (OSError, ValueError):
                pass
        raise ModelLoadError(f"cannot load '{subfolder}' from {folder}: {first}") from None


def state_mismatch(own: dict[str, tuple], file: dict[str, tuple]) -> str | None:
    """Why a state dict of these shapes (`file`) does not fit a model's (`own`), naming a weight of each kind;
    None when it fits exactly."""
    missing, unexpected = sorted(set(own) - set(file)), sorted(set(file) - set(own))
    mismatched = sorted(k for k in own.keys() & file.keys() if own[k] != file[k])
    parts = []
    if missing:
        parts.append(f"{len(missing)} weights missing (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[0]})")
    if mismatched:
        k = mismatched[0]
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {k}: file {file[k]}, model {own[k]})")
    return "; ".join(parts) or None


def load_unet_file(unet: Any, unet_file: Path) -> None:
    """Swap a UNet state dict (.safetensors) into `unet`; the file must fit the architecture exactly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not unet_file.is_file():
        raise ModelLoadError(f"UNet file not found: {unet_file}")
    try:
        state = load_file(str(unet_file))
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(f"UNet file {unet_file} is not a readable .safetensors file: {e}") from None
    why = state_mismatch({k: tuple(v.shape) for k, v in unet.state_dict().items()},
                         {k: tuple(v.shape) for k, v in state.items()})
    if why:
        raise ModelLoadError(
            f"UNet file {unet_file} does not fit this model's UNet architecture: {why}. "
            "Use the base model the UNet was trained from (SDXL base for NitroSD-Realism / -Vibrant)."
        )
    unet.load_state_dict(state, strict=True)


def quiet_libraries() -> None:
    """Weight-loading progress bars and dtype hints from diffusers/transformers are noise in a CLI or log."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _shift(scheduler_config: dict, shift: int | None) -> int:
    if scheduler_config.get(SHIFT_KEY) is not None:
        resolved = int(scheduler_config[SHIFT_KEY])
        if shift is not None and shift != resolved:
            log.warning("model folder sets %s=%d; ignoring --shift %d", SHIFT_KEY, resolved, shift)
        return resolved
    return DEFAULT_SHIFT if shift is None else int(shift)


def _load_folder(folder: Path) -> tuple[str, dict, dict]:
    """(family, components, scheduler config) of a diffusers folder."""
    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = _read_json(folder / "model_index.json", "model_index.json (is this a diffusers model folder?)")
    pipeline_class = index.get("_class_name")
    if pipeline_class in SDXL_PIPELINES:
        family = "sdxl"
    elif pipeline_class in SD_PIPELINES:
        family = "sd"
    else:
        supported = ", ".join(sorted(SDXL_PIPELINES | SD_PIPELINES))
        raise ModelLoadError(f"unsupported pipeline class {pipeline_class!r} in {folder}; supported: {supported}")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    parts = {"unet": _load_component(UNet2DConditionModel, folder, "unet"),
             "vae": _load_component(AutoencoderKL, folder, "vae")}
    if family == "sdxl":
        parts["tokenizers"] = [_load_component(CLIPTokenizer, folder, n) for n in ("tokenizer", "tokenizer_2")]
        parts["text_encoders"] = [
            _load_component(CLIPTextModel, folder, "text_encoder"),
            _load_component(CLIPTextModelWithProjection, folder, "text_encoder_2"),
        ]
    else:
        parts["tokenizers"] = [_load_component(CLIPTokenizer, folder, "tokenizer")]
        parts["text_encoders"] = [_load_component(CLIPTextModel, folder, "text_encoder")]
    if (folder / "vae_preview").is_dir():
        parts["preview_vae"] = _load_component(AutoencoderTiny, folder, "vae_preview")
    return family, parts, scheduler_config


def load_model(model: str | Path | ModelSource, unet_file: str | Path | ModelSource | None = None,
               shift: int | None = None) -> LoadedModel:
    """Load `model`: a local diffusers folder, a cached hub repo id, or a single-file checkpoint (any form
    nitrofusion/sources.py resolves, or a ModelSource it made). Shift: the scheduler config's `shifted_timestep`
    wins, else `shift`, else 250 (single files carry none: NitroSD-Realism 250, -Vibrant 500)."""
    quiet_libraries()
    source = resolve_model(model)
    if source.kind == "single_file":
        from .single_file import load_single_file

        family, parts, scheduler_config = load_single_file(source.path, source.config)
    else:
        try:
            family, parts, scheduler_config = _load_folder(source.path)
        except ModelLoadError as e:
            if source.kind != "hub":
                raise
            # A cached snapshot missing a component: usually a download that stopped or was filtered.
            raise ModelLoadError(f"{e} (for {source.given}: {fetch_hint(source.repo_id, None)})") from None
    unet_source = resolve_unet(unet_file) if unet_file is not None else None
    if unet_source is not None:
        load_unet_file(parts["unet"], unet_source.path)
    preview_vae = parts.get("preview_vae")
    for module in (parts["unet"], parts["vae"], *parts["text_encoders"], *([preview_vae] if preview_vae else [])):
        module.eval().requires_grad_(False)
    extras = {"name": source.name, "source": source.describe()}
    if unet_source is not None:
        extras["source"]["unet"] = unet_source.describe()
    model = LoadedModel(
        path=source.path,
        family=family,
        unet=parts["unet"],
        vae=parts["vae"],
        text_encoders=parts["text_encoders"],
        tokenizers=parts["tokenizers"],
        scheduler_config=scheduler_config,
        shift=_shift(scheduler_config, shift),
        preview_vae=preview_vae,
        extras=extras,
    )
    _check_consistent(model)
    return model


def _check_consistent(model: LoadedModel) -> None:
    """Catch mixed-up components early, with a message, rather than a shape error mid-generation."""
    width = sum(int(te.config.hidden_size) for te in model.text_encoders)
    cross = model.unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if int(cross) != width:
        raise ModelLoadError(
            f"the UNet expects text embeddings of width {cross} but the text encoder(s) give {width}: "
            f"is the UNet from another model family than {model.path}?"
        )
    if model.unet.config.in_channels != model.vae.config.latent_channels:
        raise ModelLoadError(
            f"the UNet takes {model.unet.config.in_channels} latent channels but the VAE makes "
            f"{model.vae.config.latent_channels}"
        )
