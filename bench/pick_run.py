"""Choose among training runs of one recipe (seeds, variants) on a validation set that `nitrofusion eval` never
uses, so the chosen model's EVAL.md rows are not the figures it was chosen on.

The validation prompts, their noise and the FID reference images come from other dataset indices and seeds than the
eval set's (trainer/evaluate.py: VAL_OFFSET, VAL_REAL_OFFSET, VAL_SEED0 against EVAL_OFFSET, REAL_OFFSET, SEED0).
Each run's exported model makes 1-step images through the inference pipeline; the table gives alignment and
shapes-FID with their 95% intervals. The pick: the lowest shapes-FID among the runs whose alignment is within
`--alignment-slack` points of the best one's (alignment is the first goal; FID separates runs whose alignment is
within noise of each other).

    python bench/pick_run.py --recipe shapes16 --run seed0=W0/model --run seed1=W1/model --images 1000
    python bench/pick_run.py --run a=A/model --run b=B/model --steps 4     # 4-step images; b paired against a
    python bench/pick_run.py --run T4=models/default --run d=D/model --run p=P/model --ref T4 --ref d
    python bench/pick_run.py --run end=W/model --run s500=W/nitro/unet_step500     # a bare UNet folder (a snapshot)

A run may be a bare diffusers UNet folder (a stage-3 snapshot, `nitro.snapshot_every`, or a work folder's init/unet):
its images come from the first run's model with that UNet's weights swapped in.

Every run draws the same prompts and noise, so each run is also paired against a reference run (the first, or each
`--ref` in turn: one table per reference): its alignment and its shapes-FID minus the reference's, with the paired
95% intervals (trainer/eval_stats.py), which tell apart differences far smaller than the rows' own intervals.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
sys.path.insert(0, str(ROOT))


def validation_scores(recipe_name: str, runs: dict[str, tuple[Path, Path | None]], n: int,
                      steps: int = 1) -> dict[str, dict]:
    """runs: name -> (model folder, UNet weights file swapped into it, or None)."""
    from nitrofusion.generation import GenerationRequest
    from nitrofusion.pipeline import load_pipeline
    from trainer.config import recipe
    from trainer.eval_stats import fid_ci, proportion_ci
    from trainer.evaluate import VAL_OFFSET, VAL_REAL_OFFSET, VAL_SEED0, detections, eval_set, real_images
    from trainer.features import extract, frechet_distance, load_feature_net

    cfg = recipe(recipe_name)
    prompts, attrs, _ = eval_set(cfg, "train", n, offset=VAL_OFFSET, seed0=VAL_SEED0)
    net = load_feature_net()
    real = extract(net, real_images(cfg, "train", n, offset=VAL_REAL_OFFSET))
    side = cfg.data.image_size
    out = {}
    for name, (model, unet_file) in runs.items():
        pipe = load_pipeline(model, unet_file, device="cpu", backend="torch", dtype="float32")
        reqs = [GenerationRequest(p, steps, VAL_SEED0 + i, side, side) for i, p in enumerate(prompts)]
        images = np.stack([im for s in range(0, n, 200) for im in pipe(reqs[s:s + 200])])
        hits = detections(images, attrs)["all"]
        feats = extract(net, images)
        out[name] = {"alignment": float(hits.mean()), "alignment_ci": proportion_ci(hits), "hits": hits,
                     "fid": frechet_distance(feats, real), "fid_ci": fid_ci(feats, real),
                     "features": feats, "reference": real}
        print(f"{name}: alignment {100 * hits.mean():.1f}%, FID {out[name]['fid']:.2f}", flush=True)
    return out


def table(scores: dict[str, dict], steps: int, ref: str | None = None) -> list[str]:
    """Markdown rows: each run's alignment and shapes-FID with their intervals. Every run drew the same prompts and
    noise, so each run but the reference (default: the first) also gets its alignment and its shapes-FID minus the
    reference's, with the paired intervals (the FID one where both runs kept their per-image features)."""
    from trainer.eval_stats import paired_difference_ci, paired_fid_difference_ci

    ref = ref if ref is not None else next(iter(scores))
    base = scores[ref]
    lines = [f"| run | {steps}-step alignment | vs {ref} (paired) | shapes-FID | vs {ref} (paired) |",
             "|---|---|---|---|---|"]
    for name, s in scores.items():
        lo, hi = s["alignment_ci"]
        flo, fhi = s["fid_ci"]
        paired = fid_paired = ""
        if name != ref:
            dlo, dhi = paired_difference_ci(s["hits"], base["hits"])
            paired = f"{100 * (s['alignment'] - base['alignment']):+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
            if s.get("features") is not None and base.get("features") is not None:
                flo_d, fhi_d = paired_fid_difference_ci(s["features"], base["features"], s["reference"])
                fid_paired = f"{s['fid'] - base['fid']:+.2f} [{flo_d:+.2f}, {fhi_d:+.2f}]"
        lines.append(f"| {name} | {100 * s['alignment']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {paired} | "
                     f"{s['fid']:.2f} [{flo:.2f}, {fhi:.2f}] | {fid_paired} |")
    return lines


def pick(scores: dict[str, dict], alignment_slack: float) -> str:
    best = max(s["alignment"] for s in scores.values())
    close = [n for n, s in scores.items() if s["alignment"] >= best - alignment_slack / 100]
    return min(close, key=lambda n: scores[n]["fid"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="shapes16")
    ap.add_argument("--run", action="append", required=True, metavar="NAME=MODEL_DIR")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--alignment-slack", type=float, default=2.0, metavar="POINTS")
    ap.add_argument("--steps", type=int, default=1, help="sampling steps of every run's images (default 1)")
    ap.add_argument("--ref", action="append", default=[], metavar="NAME",
                    help="pair every other run against this one (repeatable: one table each; default the first run)")
    args = ap.parse_args(argv)
    runs: dict[str, tuple[Path, Path | None]] = {}
    for item in args.run:
        name, sep, folder = item.partition("=")
        weights = Path(folder) / UNET_WEIGHTS
        if sep and (Path(folder) / "model_index.json").is_file():
            runs[name] = (Path(folder), None)
        elif sep and runs and weights.is_file():  # a bare UNet: the first run's model around it
            runs[name] = (next(iter(runs.values()))[0], weights)
        else:
            print(f"--run {item!r}: expected NAME=MODEL_DIR with an exported model (or, after one, NAME=UNET_DIR "
                  f"with {UNET_WEIGHTS})", file=sys.stderr)
            return 2
    unknown = [r for r in args.ref if r not in runs]
    if unknown:
        print(f"--ref {unknown[0]!r}: not one of the runs ({', '.join(runs)})", file=sys.stderr)
        return 2
    scores = validation_scores(args.recipe, runs, args.images, steps=args.steps)
    for ref in args.ref or [None]:
        print("\n" + "\n".join(table(scores, args.steps, ref)))
    print(f"\npicked: {pick(scores, args.alignment_slack)} (lowest FID within {args.alignment_slack:g} points of the "
          f"best alignment; {args.images} validation images each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
