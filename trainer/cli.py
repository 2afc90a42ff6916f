"""`nitrofusion train` (and `python -m trainer`, what `accelerate launch -m trainer` runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import BUNDLED_RECIPE, RECIPE_NAMES, STAGES, TrainConfig, apply_overrides, recipe

REPO = Path(__file__).resolve().parent.parent


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, choices=RECIPE_NAMES,
                   help=f"{BUNDLED_RECIPE} (default without --from): the bundled default model, 16x16 latents (CPU, "
                        "under 90 min); shapes: the earlier 8x8-latent model; tiny: toy sizes for tests; pretrained "
                        "(default with --from): an SDXL / SD1.x student on GPUs")
    p.add_argument("--from", dest="from_model", default=None, metavar="MODEL",
                   help="a diffusers SDXL or SD1.x model (what `generate --model` takes): its text encoders, VAE and "
                        "UNet are the frozen teacher and the discriminator's backbone")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="with --from: UTF-8 text, one prompt a line (blank lines and # comments skipped), or a folder "
                        "of image + .txt caption pairs (captions as prompts; images as reals with nitro.real=data)")
    p.add_argument("--init-unet", default=None, metavar="FILE",
                   help="start the student from this UNet state dict (.safetensors; a few-step model such as DMD2 or "
                        "NitroSD, as the paper does); without it the init stage's one-step regression runs first")
    p.add_argument("--teacher-unet", default=None, metavar="FILE",
                   help="with --from: swap this UNet state dict in as the teacher (a fine-tune), like generate --unet")
    p.add_argument("--smoke", action="store_true",
                   help="every stage at minimal sizes (2 iterations, 4 cache pairs; micro-batches kept): an end-to-end "
                        "check in minutes; use its own --work")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"exported student folder (default: models/default for {BUNDLED_RECIPE}, WORK/model otherwise)")
    p.add_argument("--work", default=None, metavar="DIR",
                   help="stage folders, checkpoints and metrics (default: outputs/<recipe>; required with --from)")
    p.add_argument("--stage", action="append", choices=STAGES, metavar="STAGE",
                   help=f"run only this stage (repeatable; default all): {', '.join(STAGES)}")
    p.add_argument("--config", metavar="FILE", help="a train_config.json to start from instead of the recipe (or one KEY=VALUE override)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set teacher.optim.steps=100 (repeatable)")


def _path(value: str) -> str:
    """Absolute when it names something here (train_config.json then records where it was); anything else (a
    model id a later loader resolves) as given."""
    p = Path(value).expanduser()
    return str(p.resolve()) if p.exists() else value


def resolve(args: argparse.Namespace) -> tuple[TrainConfig, Path, Path]:
    from .presets import smoke

    overrides = list(args.overrides)
    config_file = args.config
    if config_file and "=" in config_file and not Path(config_file).is_file():
        overrides.insert(0, config_file)  # `--config key=value` reads as an override too
        config_file = None
    flags = {"model": args.from_model, "prompts": args.prompts, "init_unet": args.init_unet,
             "teacher_unet": args.teacher_unet}
    cfg = TrainConfig.load(config_file) if config_file else recipe(args.recipe or ("pretrained" if args.from_model
                                                                                    else BUNDLED_RECIPE))
    for key, value in flags.items():
        if value:
            setattr(cfg.source, key, _path(value))
    if args.smoke:
        cfg = smoke(cfg)  # before --set, so an override still wins
    cfg = _note_pinned_stage3_seed(cfg, apply_overrides(cfg, overrides))
    src = cfg.source
    if src.model and not src.prompts:
        raise ValueError("--from needs --prompts FILE (one prompt a line) or a folder of image + caption pairs")
    if not src.model and (src.prompts or src.teacher_unet):
        raise ValueError(f"--{'prompts' if src.prompts else 'teacher-unet'} needs --from MODEL")
    if src.model and not args.work:
        raise ValueError("--from needs --work DIR (stages, checkpoints and metrics; a rerun resumes from it)")
    # A smoke run never lands in a full run's folders (its stages would be marked done) or in models/default.
    work = Path(args.work) if args.work else REPO / "outputs" / (cfg.recipe + ("-smoke" if args.smoke else ""))
    bundled = cfg.recipe == BUNDLED_RECIPE and not src.model and not args.smoke
    default_out = REPO / "models" / "default" if bundled else work / "model"
    return cfg, work, Path(args.out) if args.out else default_out


def _note_pinned_stage3_seed(before: TrainConfig, cfg: TrainConfig) -> TrainConfig:
    """A recipe may pin stage 3's seed (shapes16: nitro.seed=1, the run its model came from); then --set run.seed
    reseeds every stage but stage 3, and a rerun of stage 3 alone is bit for bit the same model. Say so, once."""
    if cfg.run.seed != before.run.seed and cfg.nitro.seed is not None and cfg.nitro.seed == before.nitro.seed:
        print(f"train: note: stage 3 keeps nitro.seed={cfg.nitro.seed} (the recipe pins it); run.seed={cfg.run.seed} "
              f"seeds the other stages. --set nitro.seed={cfg.run.seed} reseeds stage 3 too.", file=sys.stderr)
    return cfg


def run_from_args(args: argparse.Namespace) -> int:
    from .recipe import run

    cfg, work, out = resolve(args)
    run(cfg, work, out, args.stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Train a NitroFusion student.")
    add_arguments(p)
    args = p.parse_args(argv)
    from nitrofusion.errors import NitroError

    try:
        return run_from_args(args)
    except (ValueError, NitroError) as e:  # config and input errors: one line, as the rest of the CLI
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

    run(cfg, work, out, args.stage)  # bad --from / --prompts / --init-unet / stages raise NitroError: one line
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default=str(REPO / "outputs" / BUNDLED_RECIPE), metavar="DIR",
                   help="the training work folder (default: outputs/<the bundled model's recipe>); its config is read from there")
    p.add_argument("--model", default=str(REPO / "models" / "default"), metavar="DIR",
                   help="the exported student folder the student rows run through (default: models/default)")
    p.add_argument("--images", type=int, default=2000, help="images per row, also per FID side (default 2000)")
    p.add_argument("--no-ablations", dest="ablations", action="store_false",
                   help="skip the 1-step ablation rows (each trains a stage-3 variant first)")
    p.add_argument("--controls-only", action="store_true",
                   help="of the ablation rows, train and score only the control (no discriminator signal, whole "
                        "schedule): the comparison that says whether the pool earns its place, at a seventh the cost")
    p.add_argument("--out", default=str(REPO / "EVAL.md"), metavar="FILE", help="the report (default EVAL.md)")
    p.add_argument("--assets", default=None, metavar="DIR",
                   help="folder for the PNGs (default: eval/ beside --out)")
    p.add_argument("--train-features", action="store_true",
                   help="retrain the frozen shapes-FID feature CNN (trainer/assets/) before evaluating")


def eval_command(args: argparse.Namespace) -> int:
    from nitrofusion.errors import NitroError

    from .evaluate import run_config_file

    if args.images < 2:
        raise NitroError("--images must be at least 2 (FID needs a covariance)")
    work = Path(args.work)
    cfg_file = run_config_file(work)
    if cfg_file is None and not args.train_features:
        raise NitroError(f"{work} holds no trained stages: run `nitrofusion train --recipe {BUNDLED_RECIPE}` first")
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
    from .evaluate import CONTROLS

    names = list(CONTROLS) if args.controls_only else None
    results = evaluate(cfg, work, Path(args.model), args.images, args.ablations, assets, ablation_names=names)
    command = " ".join(["nitrofusion eval", *sys.argv[2:]]) if sys.argv[1:2] == ["eval"] else "nitrofusion eval"
    write_markdown(results, out, assets, command, cfg)
    print(f"wrote {out} and {assets}/")
    return 0

