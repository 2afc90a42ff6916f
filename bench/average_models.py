"""Average the UNets of several exported models of one recipe (a "model soup"), or interpolate a model toward a
one-step init, and write the result as an exported model that `bench/pick_run.py` and `nitrofusion eval` take.

Stage-3 runs that start from one init and differ only in their seed (or in a draw weight) are fine-tunes of one
network, so their weights may average into a model with less of any one run's seed noise (round 28: stage 3's seed
alone moves the 1-step shapes-FID by ~12). Everything but the UNet (VAE, text encoder, scheduler, config) is the
first model's.

    python bench/average_models.py --out SOUP --model A/model --model B/model
    python bench/average_models.py --out MIX --model A/model --model W/init/unet --weight 0.5 --weight 0.5

A `--model` is an exported model folder (with unet/) or a bare diffusers UNet folder (a work folder's init/unet);
the first must be a model folder. `--weight` (one per model, normalised to sum 1; default equal).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def unet_dir(folder: Path) -> Path:
    return folder / "unet" if (folder / "unet" / WEIGHTS_FILE).is_file() else folder


def average_state_dicts(dirs: list[Path], weights: list[float]) -> dict:
    """The weighted mean of every tensor, in float64 and cast back to each tensor's dtype; integer tensors
    (counters, if any) come from the first model. Refuses UNets whose tensors differ in names or shapes."""
    from safetensors.torch import load_file

    total = sum(weights)
    out: dict = {}
    dtypes: dict = {}
    for d, w in zip(dirs, weights):
        sd = load_file(str(d / WEIGHTS_FILE))
        if not out:
            dtypes = {k: v.dtype for k, v in sd.items()}
            out = {k: (v.double() * (w / total) if v.is_floating_point() else v.clone()) for k, v in sd.items()}
            continue
        if set(sd) != set(out):
            raise ValueError(f"{d}: its UNet's tensors differ in names from {dirs[0]}'s")
        for k, v in sd.items():
            if v.shape != out[k].shape:
                raise ValueError(f"{d}: {k} has shape {tuple(v.shape)}, {dirs[0]} has {tuple(out[k].shape)}")
            if v.is_floating_point():
                out[k] += v.double() * (w / total)
    return {k: v.to(dtypes[k]).contiguous() for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, type=Path)
    ap.add_argument("--weight", action="append", type=float, default=[])
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    if not (args.model[0] / "model_index.json").is_file():
        print(f"--model {args.model[0]}: the first must be an exported model folder", file=sys.stderr)
        return 2
    weights = args.weight or [1.0] * len(args.model)
    if len(weights) != len(args.model) or any(w < 0 for w in weights) or sum(weights) <= 0:
        print("--weight: one non-negative weight per --model, not all zero", file=sys.stderr)
        return 2
    dirs = [unet_dir(m) for m in args.model]
    for d in dirs:
        if not (d / WEIGHTS_FILE).is_file():
            print(f"{d}: no {WEIGHTS_FILE}", file=sys.stderr)
            return 2
    from safetensors.torch import save_file

    try:
        sd = average_state_dicts(dirs, weights)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    shutil.copytree(args.model[0], args.out)
    save_file(sd, str(args.out / "unet" / WEIGHTS_FILE))
    (args.out / "average.json").write_text(json.dumps(
        {"models": [str(m) for m in args.model], "weights": weights}, indent=1) + "\n")
    print(f"wrote {args.out} ({len(dirs)} UNets, weights {weights})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
