"""Run the recipe's stages in order, each skipped when done and resumed when interrupted.

Work folder layout (`--work`, default outputs/<recipe>):
  autoencoder/vae  text/{tokenizer,text_encoder}  teacher/unet  cache/chunk_*.pt  init/unet  nitro/unet
each stage folder also holds checkpoint/ (while running), metrics.csv, train_config.json and DONE.
The exported student goes to `--out` (default models/default for the shapes recipe); the last stage, preview,
distils a tiny decoder into `<out>/vae_preview/` (trainer/preview_decoder.py, on the CPU, minutes).
"""

from __future__ import annotations

from pathlib import Path

from .config import STAGES, TrainConfig
from .loop import make_accelerator


def stage_dirs(work: Path) -> dict[str, Path]:
    return {name: work / name for name in STAGES if name != "export"}


def frozen_dirs(work: Path) -> dict[str, Path]:
    return {"vae": work / "autoencoder" / "vae", "tokenizer": work / "text" / "tokenizer",
            "text_encoder": work / "text" / "text_encoder"}


def run(cfg: TrainConfig, work: Path, out: Path, stages: list[str] | None = None) -> Path | None:
    """Run `stages` (default: all, in order). Returns the exported folder when export ran."""
    from nitrofusion.models import quiet_libraries

    from .export import export_student
    from .stage0 import train_autoencoder, train_text
    from .stage1 import train_teacher
    from .stage2 import build_cache, train_init
    from .stage3 import train_nitro

    quiet_libraries()
    todo = list(STAGES) if not stages else stages
    unknown = [s for s in todo if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGES)}")
    acc = make_accelerator(cfg.run)
    work, out = Path(work), Path(out)
    d, fz = stage_dirs(work), frozen_dirs(work)
    teacher_unet, init_unet, nitro_unet = d["teacher"] / "unet", d["init"] / "unet", d["nitro"] / "unet"
    exported = None
    for name in STAGES:  # always in pipeline order, whatever order they were asked in
        if name not in todo:
            continue
        if name == "autoencoder":
            train_autoencoder(cfg, d[name], acc)
        elif name == "text":
            train_text(cfg, d[name], acc)
        elif name == "teacher":
            train_teacher(cfg, d[name], fz, acc)
        elif name == "cache":
            build_cache(cfg, d[name], fz, teacher_unet, acc)
        elif name == "init":
            train_init(cfg, d[name], fz, teacher_unet, d["cache"], acc)
        elif name == "nitro":
            train_nitro(cfg, d[name], fz, teacher_unet, init_unet, d["cache"], acc)
        elif name == "export":
            if acc.is_main_process:
                exported = export_student(cfg, out, nitro_unet, fz)
                print(f"[export] wrote {exported}", flush=True)
            acc.wait_for_everyone()
        elif name == "preview":
            if acc.is_main_process:
                from .preview_decoder import run_stage

                run_stage(cfg, d[name], out, log=lambda m: print(m, flush=True))
            acc.wait_for_everyone()
    return exported
