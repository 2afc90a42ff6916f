"""Save the student as a diffusers pipeline folder that `nitrofusion.pipeline.load_pipeline` loads: a
StableDiffusionPipeline for the shapes source, the source model's own class (SDXL in, SDXL out) for `--from`.

The scheduler is diffusers' LCMScheduler on SDXL's noise schedule, with `shifted_timestep` registered (the key
the official NitroFusion recipe uses), so the server and CLI pick the training shift up with no flag.
"""

from __future__ import annotations

from pathlib import Path

from nitrofusion.models import SHIFT_KEY

from .config import TrainConfig
from .models import NOISE_SCHEDULE


def student_scheduler(shift: int, schedule: dict | None = None):
    from diffusers import LCMScheduler

    sched = LCMScheduler(**(schedule or NOISE_SCHEDULE), prediction_type="epsilon", original_inference_steps=4,
                         timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True)
    sched.register_to_config(**{SHIFT_KEY: int(shift)})
    return sched


def export_student(cfg: TrainConfig, out: Path, unet_dir: Path, frozen_dirs: dict[str, Path]) -> Path:
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(frozen_dirs["vae"]),
        text_encoder=CLIPTextModel.from_pretrained(frozen_dirs["text_encoder"]),
        tokenizer=CLIPTokenizer.from_pretrained(frozen_dirs["tokenizer"]),
        unet=UNet2DConditionModel.from_pretrained(unet_dir),
        scheduler=student_scheduler(cfg.nitro.shift),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    cfg.save(out / "train_config.json")  # how it was made; diffusers ignores the extra file
    return out


def export_pretrained(cfg: TrainConfig, model, out: Path, unet_dir: Path, schedule: dict, zero_empty: bool) -> Path:
    """The source model (a `nitrofusion.models.LoadedModel`) with the student's UNet and the shifted LCM scheduler,
    in the source's pipeline class; its tiny preview decoder (vae_preview/) comes along when it has one."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    sched = student_scheduler(cfg.nitro.shift, schedule)
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=unet, scheduler=sched,
            force_zeros_for_empty_prompt=zero_empty, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=unet,
            scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out)
    if model.preview_vae is not None:
        model.preview_vae.save_pretrained(out / "vae_preview")
    cfg.save(out / "train_config.json")
    return out
