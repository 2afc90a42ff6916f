"""Every trainer knob in one dataclass tree, validated at construction and saved as JSON beside each checkpoint.

`recipe("shapes16")` is the CPU recipe for the bundled default model (16x16 latents; `recipe("shapes")` the
earlier 8x8 one, the dataclass defaults); `recipe("tiny")` is the same pipeline at
toy sizes for tests; `recipe("pretrained")` the defaults for `--from MODEL` (trainer/presets.py holds the latter
two and `smoke()`). Overrides are dotted paths: `teacher.steps=200`, `nitro.pool.tasks=...`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from .stage_configs import (  # noqa: F401 - re-exported: every trainer module imports its config from here
    DISC_TIMESTEPS,
    SOLVERS,
    TASKS,
    AutoencoderConfig,
    CacheConfig,
    DataConfig,
    InitConfig,
    NitroConfig,
    OptimConfig,
    PoolConfig,
    PreviewConfig,
    TeacherConfig,
    TextConfig,
    UNetConfig,
    _check,
)

STAGES = ("autoencoder", "text", "teacher", "cache", "init", "nitro", "export", "preview")
# The stages only the shapes source runs (it trains its own frozen components); every source runs the rest.
SOURCE_STAGES = ("autoencoder", "text", "teacher")
RECIPE_NAMES = ("shapes", "shapes16", "tiny", "pretrained")
# The recipe that made models/default: `nitrofusion train` without --recipe or --from runs it into models/default.
BUNDLED_RECIPE = "shapes16"


@dataclass
class RunConfig:
    device: str = "auto"  # auto | cpu | cuda (accelerate places modules)
    mixed_precision: str = "auto"  # auto: bf16 autocast on CUDA, none on CPU; or "no" / "bf16" / "fp16"
    seed: int = 0
    threads: int = 0  # torch intra-op threads on CPU (0: torch's default)
    frozen_dtype: str = "auto"  # frozen networks' weights: auto (bf16/fp16 with mixed precision on GPUs) | fp32 | ...

    def __post_init__(self):
        _check(self.device in ("auto", "cpu", "cuda"), "run.device must be auto, cpu or cuda")
        _check(self.mixed_precision in ("auto", "no", "bf16", "fp16"), "run.mixed_precision: auto|no|bf16|fp16")
        _check(self.frozen_dtype in ("auto", "fp32", "bf16", "fp16"), "run.frozen_dtype: auto|fp32|bf16|fp16")


@dataclass
class SourceConfig:
    """Where the frozen components and prompts come from. Empty `model`: the shapes source (stages autoencoder,
    text and teacher train them from scratch; prompts from the grammar). Else `nitrofusion train --from MODEL`:
    the model's text encoders, VAE and UNet (the frozen teacher and the discriminator's backbone)."""

    model: str = ""  # --from: a diffusers SDXL or SD1.x model (what `nitrofusion generate --model` loads)
    prompts: str = ""  # --prompts: a text file (one prompt a line) or a folder of image + .txt caption pairs
    teacher_unet: str = ""  # --teacher-unet: a UNet state dict swapped in as the teacher (a fine-tune)
    init_unet: str = ""  # --init-unet: the student's start (a few-step UNet); else the init stage's regression


@dataclass
class TrainConfig:
    recipe: str = "shapes"
    source: SourceConfig = field(default_factory=SourceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    init: InitConfig = field(default_factory=InitConfig)
    nitro: NitroConfig = field(default_factory=NitroConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        _check(not (self.nitro.reg_multistep == "teacher" and self.teacher.solver == "ddim"),
               "nitro.reg_multistep=teacher starts the teacher part-way: use teacher.solver dpmsolver++, euler or lcm")

    def cache_draw_weight(self, stage: str) -> float:
        """How much more often `stage` ("init" or "nitro") draws cached pairs of small striped or checkered objects:
        cache.small_patterned_weight, which stage 3 overrides with nitro.small_patterned_weight when that is set."""
        if stage == "nitro" and self.nitro.small_patterned_weight is not None:
            return self.nitro.small_patterned_weight
        return self.cache.small_patterned_weight

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, d, "")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _build(cls: type, d: dict, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]!s}; known: {', '.join(sorted(known))}")
    kwargs = {}
    defaults = cls()
    for name, value in d.items():
        current = getattr(defaults, name)
        if is_dataclass(current) and isinstance(value, dict):
            sub = asdict(current)
            sub.update(value)
            kwargs[name] = _build(type(current), sub, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`a.b.c=value` strings; values parse as JSON when they can (numbers, true, [1,2]), else as strings."""
    d = cfg.to_dict()
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. teacher.optim.steps=100")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = d
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"unknown config section {p!r} in override {item!r}")  # noqa: TRY004
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"unknown config key {key!r}; known here: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return TrainConfig.from_dict(d)


def recipe(name: str) -> TrainConfig:
    if name == "shapes":
        return TrainConfig()
    if name not in RECIPE_NAMES:
        raise ValueError(f"unknown recipe {name!r}: choose from {', '.join(RECIPE_NAMES)}")
    from .presets import PRESETS

    return PRESETS[name]()


__all__ = ["BUNDLED_RECIPE", "RECIPE_NAMES", "SOURCE_STAGES", "STAGES", "TASKS", "TrainConfig", "apply_overrides", "recipe"]
