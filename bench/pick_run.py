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
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def validation_scores(recipe_name: str, runs: dict[str, Path], n: int, steps: int = 1) -> dict[str, dict]:
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
    for name, model in runs.items():
        pipe = load_pipeline(model, device="cpu", backend="torch", dtype="float32")
        reqs = [GenerationRequest(p, steps, VAL_SEED0 + i, side, side) for i, p in enumerate(prompts)]
        images = np.stack([im for s in range(0, n, 200) for im in pipe(reqs[s:s + 200])])
        hits = detections(images, attrs)["all"]
        feats = extract(net, images)
        out[name] = {"alignment": float(hits.mean()), "alignment_ci": proportion_ci(hits), "hits": hits,
                     "fid": frechet_distance(feats, real), "fid_ci": fid_ci(feats, real)}
        print(f"{name}: alignment {100 * hits.mean():.1f}%, FID {out[name]['fid']:.2f}", flush=True)
    return out


def table(scores: dict[str, dict], steps: int) -> list[str]:
    """Markdown rows: each run's alignment and shapes-FID with their intervals. Every run drew the same prompts and
    noise, so each run after the first also gets its alignment minus the first run's, with the paired interval."""
    from trainer.eval_stats import paired_difference_ci

    first = next(iter(scores.values()))
    lines = [f"| run | {steps}-step alignment | vs the first run (paired) | shapes-FID |", "|---|---|---|---|"]
    for i, (name, s) in enumerate(scores.items()):
        lo, hi = s["alignment_ci"]
        flo, fhi = s["fid_ci"]
        paired = ""
        if i:
            dlo, dhi = paired_difference_ci(s["hits"], first["hits"])
            paired = f"{100 * (s['alignment'] - first['alignment']):+.1f} [{100 * dlo:+.1f}, {100 * dhi:+.1f}]"
        lines.append(f"| {name} | {100 * s['alignment']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] | {paired} | "
                     f"{s['fid']:.2f} [{flo:.2f}, {fhi:.2f}] |")
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
    args = ap.parse_args(argv)
    runs = {}
    for item in args.run:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "model_index.json").is_file():
            print(f"--run {item!r}: expected NAME=MODEL_DIR with an exported model", file=sys.stderr)
            return 2
        runs[name] = Path(folder)
    scores = validation_scores(args.recipe, runs, args.images, steps=args.steps)
    print("\n" + "\n".join(table(scores, args.steps)))
    print(f"\npicked: {pick(scores, args.alignment_slack)} (lowest FID within {args.alignment_slack:g} points of the "
          f"best alignment; {args.images} validation images each)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
