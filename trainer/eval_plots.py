"""`nitrofusion eval`'s loss-curve figure (eval/loss_curves.png): each stage's metrics.csv, raw and smoothed."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_losses(work: Path, path: Path) -> None:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The L2 term is logged on one-step iterations only (NaN on the others): its own panel, NaNs dropped.
    # The heads' accuracy (share of logits on the right side of 0, on reals and on fakes) says whether the pool
    # learns at all: both near 0.5 is chance, whatever loss_d reads (2 ln 2 ~ 1.386 at chance for softplus).
    panels = [("autoencoder", ["rec"]), ("teacher", ["loss"]), ("init", ["loss"]), ("nitro", ["loss_g", "loss_d"]),
              ("nitro", ["loss_reg"]), ("nitro", ["acc_real", "acc_fake"])]
    # With the DMD term (nitro.dmd_weight > 0) its loss and the fake score's own epsilon loss: the fake score has to
    # keep up with the student for the term to be distribution matching (docs/training.md, round 19).
    if _has_column(work / "nitro" / "metrics.csv", "loss_dmd"):
        panels.append(("nitro", ["loss_dmd", "loss_fake"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (stage, keys) in zip(axes, panels):
        f = work / stage / "metrics.csv"
        if not f.is_file():
            ax.set_title(f"{stage} (no metrics)")
            continue
        # A resumed stage appends from its checkpoint: keep the last row per step so the curve does not loop.
        rows = sorted({int(float(r["step"])): r for r in csv.DictReader(f.open())}.values(),
                      key=lambda r: float(r["step"]))
        for k in keys:
            if k not in rows[0]:
                continue
            pairs = [(float(r["step"]), float(r[k])) for r in rows if r.get(k) not in (None, "", "nan")]
            steps, vals = (np.array(v) for v in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
            if not len(vals):
                continue
            win = max(1, len(vals) // 40)  # light smoothing: raw per-step GAN losses are mostly noise
            smooth = np.convolve(vals, np.ones(win) / win, mode="valid")
            ax.plot(steps, vals, alpha=0.25, lw=0.8)
            ax.plot(steps[win - 1:], smooth, label=k)
        titles = {"loss_reg": f"{stage} (L2 term, 1-step iterations)", "acc_real": f"{stage} heads' accuracy",
                  "loss_dmd": f"{stage} (DMD term; fake score)"}
        ax.set_title(titles.get(keys[0], stage))
        if keys[0] == "acc_real":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")  # chance
        ax.set_xlabel("step")
        if stage in ("autoencoder", "teacher", "init") or keys[0] in ("loss_reg", "loss_dmd"):
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _has_column(f: Path, name: str) -> bool:
    import csv

    if not f.is_file():
        return False
    with f.open() as fh:
        return name in (next(csv.reader(fh), None) or [])
