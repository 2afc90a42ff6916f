"""`nitrofusion train` (and `python -m trainer`, what `accelerate launch -m trainer` runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import RECIPES, STAGES, TrainConfig, apply_overrides, recipe

REPO = Path(__file__).resolve().parent.parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default="shapes", choices=sorted(RECIPES),
                   help="shapes: the bundled default model (CPU, ~90 min); tiny: toy sizes for smoke tests")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="exported student folder (default: models/default for shapes, outputs/tiny/model for tiny)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="stage folders, checkpoints and metrics (default: outputs/<recipe>)")
    p.add_argument("--stage", action="append", choices=STAGES, metavar="STAGE",
                   help=f"run only this stage (repeatable; default all): {', '.join(STAGES)}")
    p.add_argument("--config", metavar="FILE", help="a train_config.json to start from instead of the recipe (or one KEY=VALUE override)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set teacher.optim.steps=100 (repeatable)")


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, Path, Path]:
    overrides = list(args.overrides)
    config_file = args.config
    if config_file and "=" in config_file and not Path(config_file).is_file():
        overrides.insert(0, config_file)  # `--config key=value` reads as an override too
        config_file = None
    cfg = TrainConfig.load(config_file) if config_file else recipe(args.recipe)
    cfg = apply_overrides(cfg, overrides)
    work = Path(args.work) if args.work else REPO / "outputs" / cfg.recipe
    default_out = REPO / "models" / "default" if cfg.recipe == "shapes" else work / "model"
    return cfg, work, Path(args.out) if args.out else default_out


def run_from_args(args: argparse.Namespace) -> int:
    from .recipe import run

    cfg, work, out = resolve(args)
    run(cfg, work, out, args.stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train a NitroFusion student.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as e:  # config errors: one line, as the rest of the CLI
        print(f"train: error: {e}", file=sys.stderr)
        return 2


def train_command(args: argparse.Namespace) -> int:
    """`nitrofusion train`: config mistakes become the CLI's one-line error (exit 2), not a traceback."""
    from nitrofusion.errors import NitroError

    try:
        cfg, work, out = resolve(args)
    except (ValueError, OSError) as e:
        raise NitroError(str(e)) from None
    from .recipe import run

    run(cfg, work, out, args.stage)
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default=str(REPO / "outputs" / "shapes"), metavar="DIR",
                   help="the training work folder (default: outputs/shapes); its config is read from there")
    p.add_argument("--model", default=str(REPO / "models" / "default"), metavar="DIR",
                   help="the exported student folder the student rows run through (default: models/default)")
    p.add_argument("--images", type=int, default=2000, help="images per row, also per FID side (default 2000)")
    p.add_argument("--no-ablations", dest="ablations", action="store_false",
                   help="skip the 1-step ablation rows (each trains a stage-3 variant first)")
    p.add_argument("--out", default=str(REPO / "EVAL.md"), metavar="FILE", help="the report (default EVAL.md)")
    p.add_argument("--assets", default=None, metavar="DIR",
                   help="folder for the PNGs (default: eval/ beside --out)")
    p.add_argument("--train-features", action="store_true",
                   help="retrain the frozen shapes-FID feature CNN (trainer/assets/) before evaluating")


def eval_command(args: argparse.Namespace) -> int:
    from nitrofusion.errors import NitroError

    work = Path(args.work)
    cfg_file = next((work / s / "train_config.json" for s in ("nitro", "init", "teacher")
                     if (work / s / "train_config.json").is_file()), None)
    if args.images < 2:
        raise NitroError("--images must be at least 2 (FID needs a covariance)")
    if cfg_file is None and not args.train_features:
        raise NitroError(f"{work} holds no trained stages: run `nitrofusion train --recipe shapes` first")
    from nitrofusion.models import quiet_libraries

    quiet_libraries()
    if args.train_features:
        from .features import train_feature_net

        train_feature_net()
        if cfg_file is None:
            return 0
    from .evaluate import evaluate, write_markdown

    cfg = TrainConfig.load(cfg_file)
    out = Path(args.out)
    assets = Path(args.assets) if args.assets else out.parent / "eval"
    if not (Path(args.model) / "model_index.json").is_file():
        raise NitroError(f"{args.model} is not an exported student: run the trainer's export stage first")
    results = evaluate(cfg, work, Path(args.model), args.images, args.ablations, assets)
    command = " ".join(["nitrofusion eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else "nitrofusion eval"
    write_markdown(results, out, assets, command, cfg)
    print(f"wrote {out} and {assets}/")
    return 0

