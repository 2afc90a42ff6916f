"""Score a trained `shapes` teacher over guidance scales and step counts before caching its samples (issue 15:
the cache inherits whatever the teacher's sampler settings give). Same prompts, noise, detector and shapes-FID
as `nitrofusion eval`'s teacher row, each figure with its 95% bootstrap interval.

    python bench/teacher_guidance.py --work outputs/shapes                     # 400 prompts, guidance 1/3/5/7.5
    python bench/teacher_guidance.py --work W --images 200 --guidance 3 5 --steps 10 25
    python bench/teacher_guidance.py --work W --guidance 3 --unet teacher/unet_raw teacher/unet  # EMA vs raw, paired
    python bench/teacher_guidance.py --work W --guidance 3 --images 1000 --validation --unet A B  # choose a teacher
    python bench/teacher_guidance.py --work W --guidance 3 --images 2000 --unet /other/run/teacher/unet teacher/unet \
        --by-fill                          # paired against another run's teacher, and per object size and fill

`--unet` folders are relative to --work or absolute; teachers from other runs must share its autoencoder and text
encoder (the latents and prompt embeddings are --work's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="a shapes run's folder (teacher/unet, autoencoder, text)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5])
    p.add_argument("--steps", type=int, nargs="+", default=[25])
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--validation", action="store_true",
                   help="score on bench/pick_run.py's validation prompts, noise and reference images, which "
                        "`nitrofusion eval` never uses: for choosing among teachers without choosing on the eval set")
    p.add_argument("--unet", nargs="+", default=["teacher/unet"],
                   help="teacher UNet folders, relative to --work (e.g. teacher/unet_raw teacher/unet: an EMA teacher's "
                        "trained weights and its average); rows after the first get their paired difference to it")
    p.add_argument("--by-fill", action="store_true",
                   help="also each row's alignment per object size and fill (where the shapes16 teachers miss)")
    a = p.parse_args(argv)

    from nitrofusion.models import quiet_libraries
    from trainer.config import TrainConfig
    from trainer.eval_stats import FILL_CELLS, cell, fill_cells, paired_difference_ci
    from trainer.evaluate import VAL_OFFSET, VAL_REAL_OFFSET, VAL_SEED0, Row, eval_set, generate, real_images, score
    from trainer.features import extract, load_feature_net
    from trainer.recipe import frozen_dirs
    from trainer.stage1 import load_frozen

    quiet_libraries()
    cfg = TrainConfig.load(a.work / "teacher" / "train_config.json")
    frozen = load_frozen(frozen_dirs(a.work), "cpu")
    net = load_feature_net()
    if a.validation:
        prompts, attrs, noise = eval_set(cfg, a.split, a.images, offset=VAL_OFFSET, seed0=VAL_SEED0)
        real = extract(net, real_images(cfg, a.split, a.images, offset=VAL_REAL_OFFSET))
    else:
        prompts, attrs, noise = eval_set(cfg, a.split, a.images)
        real = extract(net, real_images(cfg, a.split, a.images))
    print(f"teacher {', '.join(str(a.work / u) for u in a.unet)}, {a.images} {a.split} "
          f"{'validation ' if a.validation else ''}prompts")
    print("| guidance | steps | unet | alignment | vs the first row (paired) | shapes-FID | s |\n|---|---|---|---|---|---|---|")
    first = None
    by_fill = []
    for steps in a.steps:
        for g in a.guidance:
            for unet in a.unet:
                cfg.teacher.guidance_scale = g
                row = Row(f"teacher ({steps} steps, guidance {g:g})", "teacher", unet, steps, a.split)
                t0 = time.monotonic()
                images = generate(row, cfg, a.work, Path(), frozen, prompts, noise)
                r = score(row, images, attrs, net, real)
                diff = ""
                if first is None:
                    first = r
                else:
                    lo, hi = paired_difference_ci(r.hits, first.hits)
                    diff = f"{(r.alignment - first.alignment) * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
                print(f"| {g:g} | {steps} | {unet} | {cell(r.alignment, r.alignment_ci, 100, unit='%')} | {diff} | "
                      f"{cell(r.fid, r.fid_ci, fmt='.2f')} | {time.monotonic() - t0:.0f} |", flush=True)
                if a.by_fill:  # each cell's bootstrap only when asked
                    by_fill.append(f"| {g:g} | {steps} | {unet} | " + " | ".join(fill_cells(r.hits, attrs)) + " |")
    if a.by_fill:
        print("\n| guidance | steps | unet | " + " | ".join(f"{size} {fill}" for size, fill in FILL_CELLS) + " |")
        print("|---|---|---|" + "---|" * len(FILL_CELLS))
        print("\n".join(by_fill))
    return 0


if __name__ == "__main__":
    sys.exit(main())
