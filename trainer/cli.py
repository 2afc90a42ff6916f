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
