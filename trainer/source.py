"""Model sources: where the frozen networks (text encoders, VAE, teacher UNet) and the prompts come from.

The shared stages (cache, init, nitro, export) read everything through a source, so the shapes recipe and
`nitrofusion train --from MODEL` run the same stage code:
- `ShapesSource`: stages autoencoder, text and teacher train the frozen components from scratch into the work
  folder; prompts come from the shapes grammar.
- `PretrainedSource`: a diffusers SDXL or SD1.x model, loaded by `nitrofusion.models.load_model` (what
  `nitrofusion generate --model` uses): its text encoders and VAE, and its UNet (or `--teacher-unet` swapped in) as
  the teacher whose encoder is the discriminator's backbone, as in the paper (Sec. 3.2); prompts from `--prompts`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nitrofusion.errors import ModelLoadError, NitroError

from .config import SOURCE_STAGES, STAGES, TrainConfig
from .models import NOISE_SCHEDULE

SCHEDULE_KEYS = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "trained_betas")
PRETRAINED_MAX_CACHED = 1024  # prompts whose embeddings stay in memory when encoded live (--from)


@dataclass
class Frozen:
    text: Callable  # prompts -> Conditioning
    vae: Any
    teacher: Any  # the teacher UNet, fresh for this stage, on the CPU (the stage places it)


class LazyText:
    """Builds the text encoding (encoders moved to the device) on first use: a stage reading stored embeddings
    from the cache never loads them."""

    def __init__(self, build: Callable):
        self._build, self._text = build, None

    def __call__(self, prompts: list[str]):
        if self._text is None:
            self._text = self._build()
        return self._text(prompts)


def _dtype_kwargs(dtype: torch.dtype | None) -> dict:
    return {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}


def unet_file_mismatch(unet, path: Path) -> str | None:
    """Why a .safetensors UNet state dict does not fit `unet` (names the weights), from the file's header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        return f"not a readable .safetensors file ({e})"
    from nitrofusion.models import state_mismatch

    return state_mismatch({k: tuple(v.shape) for k, v in unet.state_dict().items()}, shapes)


def check_init_unet(unet, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"--init-unet file not found: {path}")
    why = unet_file_mismatch(unet, path)
    if why:
        raise ModelLoadError(f"--init-unet {path} does not fit the teacher's UNet architecture: {why}")


def student_from_file(teacher, path: str | Path):
    """A trainable fp32 UNet of the teacher's architecture holding the weights of `path` (--init-unet)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    check_init_unet(teacher, path)
    with init_empty_weights():  # no random init of a 2.6B-parameter UNet only to overwrite it
        unet = UNet2DConditionModel.from_config(teacher.config)
    unet.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True, assign=True)
    return unet.requires_grad_(True)


class ShapesSource:
    """The shapes recipe's components, trained by the stages autoencoder, text and teacher into `work`."""

    stages = STAGES

    def __init__(self, cfg: TrainConfig, work: Path):
        if cfg.data.image_size == 0:
            raise NitroError("data.image_size=0 (the model's native size) needs --from MODEL")
        if cfg.source.prompts or cfg.source.teacher_unet:
            raise NitroError("--prompts and --teacher-unet need --from MODEL (the shapes source has its own)")
        self.cfg, self.work = cfg, Path(work)
        self.dirs = {"vae": self.work / "autoencoder" / "vae", "tokenizer": self.work / "text" / "tokenizer",
                     "text_encoder": self.work / "text" / "text_encoder"}
        self.teacher_dir = self.work / "teacher" / "unet"
        self.latent_channels = cfg.autoencoder.latent_channels
        self.latent_size = cfg.data.image_size // cfg.autoencoder.scale_factor
        self.noise_schedule = dict(NOISE_SCHEDULE)
        self.family = "sd"

    def train_stage(self, name: str, folder: Path, accelerator) -> None:
        from .stage0 import train_autoencoder, train_text
        from .stage1 import train_teacher

        if name == "autoencoder":
            train_autoencoder(self.cfg, folder, accelerator)
        elif name == "text":
            train_text(self.cfg, folder, accelerator)
        else:
            train_teacher(self.cfg, folder, self.dirs, accelerator)

    def frozen(self, device, teacher_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None) -> Frozen:
        """`text_dtype` is ignored: the recipe's text encoder is tiny and stays fp32, as it was trained."""
        from diffusers import UNet2DConditionModel

        from .stage1 import load_frozen

        f = load_frozen(self.dirs, device)
        return Frozen(f["text"], f["vae"],
                      UNet2DConditionModel.from_pretrained(self.teacher_dir, **_dtype_kwargs(teacher_dtype)))

    def num_pairs(self) -> int:
        if not self.cfg.cache.num_pairs:
            raise NitroError("cache.num_pairs=0 (one pair per prompt) needs --prompts; the shapes source needs a count")
        return self.cfg.cache.num_pairs

    def prompts(self, indices) -> list[str]:
        from .shapes import ShapesDataset
        from .stage2 import CACHE_PROMPT_OFFSET

        d = self.cfg.data
        return ShapesDataset(d.image_size, d.seed, "train", d.heldout_fraction).prompts(
            [CACHE_PROMPT_OFFSET + i for i in indices])

    def real_pool(self, frozen: Frozen, accelerator, folder: Path) -> dict:
        """nitro.real=data: the teacher stage's encoded dataset latents (encoded now if it kept none)."""
        from .shapes import ShapesDataset
        from .stage1 import latent_pool

        cfg = self.cfg
        if not cfg.teacher.latent_pool:
            raise ValueError("nitro.real=data reads the teacher's latent pool: set teacher.latent_pool > 0")
        data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
        pool = latent_pool(cfg, self.work / "teacher", frozen.vae, data, accelerator)
        return {"x0": pool["latents"], "prompts": pool["prompts"]}

    def export(self, unet_dir: Path, out: Path) -> Path:
        from .export import export_student

        return export_student(self.cfg, out, unet_dir, self.dirs)


class PretrainedSource:
    """A diffusers SDXL / SD1.x model (--from), loaded on the CPU in fp32 once per stage; see the module doc."""

    # No `preview` stage: it distils a tiny decoder on the shapes dataset; an SDXL / SD1.x student takes the
    # published TAESDXL / TAESD as its vae_preview/ instead (docs/decoders.md).
    stages = tuple(s for s in STAGES if s not in (*SOURCE_STAGES, "preview"))

    def __init__(self, cfg: TrainConfig):
        from .prompts import open_prompts

        self.cfg = cfg
        if not cfg.source.prompts:
            raise NitroError("--from needs --prompts FILE (one prompt a line) or a folder of image + caption pairs")
        self._model = self._load()  # bad folder, class or --teacher-unet: a one-line error before any work
        m = self._model
        sched = m.scheduler_config
        if sched.get("prediction_type", "epsilon") != "epsilon":
            raise ModelLoadError(f"{cfg.source.model}: prediction_type {sched['prediction_type']!r} is not supported "
                                 "(the student and its LCM sampler predict epsilon, as SD1.x and SDXL do)")
        self.family = m.family
        self.noise_schedule = {k: sched[k] for k in SCHEDULE_KEYS if sched.get(k) is not None} or dict(NOISE_SCHEDULE)
        scale = m.vae_scale_factor
        if cfg.data.image_size == 0:
            cfg.data.image_size = m.native_size  # resolved here, so every stage's train_config.json records it
        down = 2 ** (len(m.unet.config.block_out_channels) - 1)
        if cfg.data.image_size % (scale * down):
            raise NitroError(f"data.image_size={cfg.data.image_size} must be a multiple of {scale * down} for this "
                             f"model (VAE {scale}x down, UNet {down}x down)")
        self.latent_channels = m.unet.config.in_channels
        self.latent_size = cfg.data.image_size // scale
        self.prompt_source = open_prompts(cfg.source.prompts)
        if cfg.source.init_unet:
            check_init_unet(m.unet, cfg.source.init_unet)
        index = Path(str(cfg.source.model)) / "model_index.json"
        self.zero_empty = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True) \
            if index.is_file() else True

    def _load(self):
        from nitrofusion.models import load_model

        return load_model(self.cfg.source.model, unet_file=self.cfg.source.teacher_unet or None)

    def _take(self):
        """The loaded model, handed over once (the first stage reuses the validating load); later stages reload,
        so no stage keeps another's networks in memory."""
        m, self._model = self._model, None
        return m if m is not None else self._load()

    def frozen(self, device, teacher_dtype: torch.dtype | None = None, text_dtype: torch.dtype | None = None) -> Frozen:
        from .conditioning import SDXLTextEncoder
        from .models import TextEncoderWrapper

        m = self._take()
        size = self.cfg.data.image_size

        def build():
            encoders = [te.to(device, text_dtype) for te in m.text_encoders]
            if m.family == "sdxl":
                return SDXLTextEncoder(m.tokenizers, encoders, size, device, self.zero_empty, PRETRAINED_MAX_CACHED)
            return TextEncoderWrapper(m.tokenizers[0], encoders[0], device, PRETRAINED_MAX_CACHED)

        teacher = m.unet if teacher_dtype is None else m.unet.to(teacher_dtype)
        return Frozen(LazyText(build), m.vae, teacher)

    def num_pairs(self) -> int:
        return self.cfg.cache.num_pairs or len(self.prompt_source)

    def prompts(self, indices) -> list[str]:
        n = len(self.prompt_source)
        return self.prompt_source.take([i % n for i in indices])

    def real_pool(self, frozen: Frozen, accelerator, folder: Path) -> dict:
        """nitro.real=data: the --prompts folder's images, VAE-encoded at the training size (the first
        teacher.latent_pool of them), saved as folder/real_pool.pt so a resumed run does not re-encode."""
        from tqdm.auto import tqdm

        from .prompts import CaptionFolder
        from .stage1 import encode_images

        src = self.prompt_source
        if not isinstance(src, CaptionFolder):
            raise NitroError("nitro.real=data needs --prompts to be a folder of image + .txt caption pairs")
        n = min(len(src), self.cfg.teacher.latent_pool or len(src))
        path = Path(folder) / "real_pool.pt"
        if path.is_file():
            pool = torch.load(path, weights_only=False)
            if len(pool["prompts"]) == n:
                return pool
        vae = frozen.vae.to(accelerator.device)
        latents = []
        for i in tqdm(range(n), desc="real images", disable=not accelerator.is_main_process):
            image = torch.from_numpy(src.image(i, self.cfg.data.image_size))[None].to(accelerator.device)
            latents.append(encode_images(vae, image).float().cpu())
        pool = {"x0": torch.cat(latents), "prompts": src.take(range(n))}
        if accelerator.is_main_process:
            torch.save(pool, path.with_suffix(".tmp"))
            path.with_suffix(".tmp").rename(path)
        return pool

    def export(self, unet_dir: Path, out: Path) -> Path:
        from .export import export_pretrained

        return export_pretrained(self.cfg, self._take(), out, unet_dir, self.noise_schedule, self.zero_empty)


def make_source(cfg: TrainConfig, work: Path) -> ShapesSource | PretrainedSource:
    return PretrainedSource(cfg) if cfg.source.model else ShapesSource(cfg, work)
