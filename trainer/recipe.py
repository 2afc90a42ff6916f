"""Run the recipe's stages in order, each skipped when done and resumed when interrupted.

Work folder layout (`--work`, default outputs/<recipe>):
  autoencoder/vae  text/{tokenizer,text_encoder}  teacher/unet   (shapes source only)
  cache/{chunk_*.pt,index.json}  init/unet  nitro/unet            (every source)
each stage folder also holds checkpoint/ (while running), metrics.csv, train_config.json and DONE.
The exported student goes to `--out` (default models/default for the shapes recipe); the last stage, preview,
distils a tiny decoder into `<out>/vae_preview/` (trainer/preview_decoder.py, on the CPU, minutes).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from .config import SOURCE_STAGES, STAGES, TrainConfig
from .loop import make_accelerator


def stage_dirs(work: Path) -> dict[str, Path]:
    return {name: work / name for name in STAGES if name != "export"}


# What each stage reads from earlier stages (the source's own stages only where the source has them: with --from the
# frozen components come from the model). "export" means the exported folder `--out`.
NEEDS = {"teacher": ("autoencoder", "text"), "cache": ("autoencoder", "text", "teacher"),
         "init": ("autoencoder", "text", "teacher", "cache"), "nitro": ("autoencoder", "text", "teacher", "cache", "init"),
         "export": ("autoencoder", "text", "nitro"), "preview": ("export",)}


def missing_stage(cfg: TrainConfig, work: Path, out: Path, todo: list[str], source_stages) -> str | None:
    """A one-line reason when a stage asked for reads a stage that is neither finished in `work` (its DONE marker;
    an interrupted stage has none) nor run before it in this call; else None. Checked before any work, so a
    `--stage nitro` on a fresh folder says what to run instead of failing deep inside a model load."""
    for name in (s for s in STAGES if s in todo):
        for need in NEEDS.get(name, ()):
            # every source's stages include export; --init-unet replaces the init stage
            if need in todo or need not in source_stages or (need == "init" and cfg.source.init_unet):
                continue
            if need == "export":
                if (out / "vae" / "config.json").is_file():
                    continue
                return (f"stage {name!r} needs the exported student in {out}, which has no vae/: add --stage export "
                        f"(or run every stage)")
            if not (work / need / "DONE").is_file():
                state = "has not finished" if (work / need).is_dir() else "has not run"
                return (f"stage {name!r} needs the {need} stage, which {state} in {work}: add --stage {need} "
                        f"(an interrupted stage resumes), or run every stage")
    return None


def frozen_dirs(work: Path) -> dict[str, Path]:
    return {"vae": work / "autoencoder" / "vae", "tokenizer": work / "text" / "tokenizer",
            "text_encoder": work / "text" / "text_encoder"}


class StageClock:
    """Wall time per stage, printed as each ends and appended to WORK/stage_times.csv (main process only), so a
    recipe's cost on a machine is read from its own run: a resumed run appends its new pieces, and a stage that
    was already done shows as a fraction of a second."""

    def __init__(self, work: Path | None):
        self.path = None if work is None else Path(work) / "stage_times.csv"
        self.times: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):
        t0 = time.monotonic()
        yield
        seconds = time.monotonic() - t0
        self.times[name] = seconds
        if self.path is not None:
            print(f"[{name}] {seconds / 60:.1f} min", flush=True)
            new = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                if new:
                    f.write("finished_utc,stage,seconds\n")
                f.write(f"{datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')},{name},{seconds:.3f}\n")

    def report(self) -> None:
        if self.path is not None and len(self.times) > 1:
            total = sum(self.times.values())
            parts = ", ".join(f"{k} {v / 60:.1f}" for k, v in self.times.items())
            print(f"[recipe] {total / 60:.1f} min in all ({parts}); {self.path}", flush=True)


def run(cfg: TrainConfig, work: Path, out: Path, stages: list[str] | None = None) -> Path | None:
    """Run `stages` (default: all the source's, in order). Returns the exported folder when export ran.
    The source (trainer/source.py) is made first, so bad input fails before any work; for `--from` it resolves
    `data.image_size=0` to the model's native size in `cfg`."""
    from nitrofusion.errors import NitroError
    from nitrofusion.models import quiet_libraries

    from .source import make_source

    quiet_libraries()
    source = make_source(cfg, work)
    todo = list(source.stages) if not stages else stages
    unknown = [s for s in todo if s not in STAGES]
    if unknown:
        raise NitroError(f"unknown stage {unknown[0]!r}: choose from {', '.join(STAGES)}")
    foreign = [s for s in todo if s not in source.stages]
    if foreign:
        raise NitroError(f"stage {foreign[0]!r} trains the shapes recipe's own components; with --from the stages "
                         f"are {', '.join(source.stages)}")
    work, out = Path(work), Path(out)
    reason = missing_stage(cfg, work, out, todo, source.stages)
    if reason:
        raise NitroError(reason)
    acc = make_accelerator(cfg.run)
    d = stage_dirs(work)
    exported = None
    clock = StageClock(work if acc.is_main_process else None)
    for name in STAGES:  # always in pipeline order, whatever order they were asked in
        if name in todo:
            with clock.stage(name):
                exported = _run_stage(name, cfg, d, source, acc, out) or exported
    clock.report()
    return exported


def _run_stage(name: str, cfg: TrainConfig, d: dict[str, Path], source, acc, out: Path) -> Path | None:
    """One stage; the exported folder when it is `export`."""
    from .stage2 import build_cache, train_init
    from .stage3 import train_nitro

    if name in SOURCE_STAGES:
        source.train_stage(name, d[name], acc)
    elif name == "cache":
        build_cache(cfg, d[name], source, acc)
    elif name == "init":
        if cfg.source.init_unet:  # the paper's setting: the student starts from a distilled few-step UNet
            if acc.is_main_process:
                print(f"[init] skipped: the student starts from --init-unet {cfg.source.init_unet}", flush=True)
            return None
        train_init(cfg, d[name], source, d["cache"], acc)
    elif name == "nitro":
        train_nitro(cfg, d[name], source, d["init"] / "unet", d["cache"], acc)
    elif name == "export":
        exported = None
        if acc.is_main_process:
            exported = source.export(d["nitro"] / "unet", out)
            print(f"[export] wrote {exported}", flush=True)
        acc.wait_for_everyone()
        return exported
    elif name == "preview":
        if acc.is_main_process:
            from .preview_decoder import run_stage

            run_stage(cfg, d[name], out, log=lambda m: print(m, flush=True))
        acc.wait_for_everyone()
    return None
