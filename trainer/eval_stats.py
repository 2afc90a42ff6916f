"""95% confidence intervals for `nitrofusion eval`'s numbers: percentile bootstrap over images, fixed seed.

Alignment: each image passes (1) or fails (0) the detector; a resample draws N images with replacement from the
row's N and takes the pass rate. FID: the generated images' 128-d features are resampled with replacement (the
dataset reference side stays fixed), and the Frechet distance is recomputed against the same reference. So the
FID interval covers the sampling noise of the generated set only, not that of the reference set. Resampling with
replacement duplicates rows, and a 128-d FID of duplicated rows sits well above the full set's (measured on
Gaussian features at 2,000 rows: +3 with a spread of +-0.7, so a plain percentile interval missed the estimate
entirely); the FID interval is therefore the bootstrap's percentiles shifted by the bootstrap's own bias (mean
resampled FID minus the full set's): the spread is the bootstrap's, centred on the estimate. It errs wide: on
the same kind of features at 400 images it was 1.6x the 95% spread of the FID over 30 independent draws.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

RESAMPLES = 1000
SEED = 0
LEVEL = 0.95


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def proportion_ci(hits, resamples: int = RESAMPLES, seed: int = SEED,
                  level: float = LEVEL) -> tuple[float, float]:
    """Interval for the mean of a per-image vector (0/1 hits; paired_difference_ci passes -1/0/1 differences)."""
    hits = np.asarray(hits, dtype=np.float64)
    if hits.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    # Resampling a 0/1 vector with replacement = a binomial draw of its pass rate; drawn as indices anyway so the
    # same code reads as "resample the images".
    idx = rng.integers(0, hits.size, size=(resamples, hits.size))
    return _bounds(hits[idx].mean(axis=1), level)


def paired_difference_ci(hits_a, hits_b, resamples: int = RESAMPLES, seed: int = SEED,
                         level: float = LEVEL) -> tuple[float, float]:
    """Interval for mean(a) - mean(b) of two 0/1 vectors over the same images (the same prompts and seeds): one
    resample draws image indices once for both rows, so what the rows share (a prompt both fail) cancels out.
    Tighter than comparing the two rows' own intervals, and the right question for "is A better than B"."""
    a, b = np.asarray(hits_a, dtype=np.float64), np.asarray(hits_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same images: {a.shape} vs {b.shape}")
    return proportion_ci(a - b, resamples, seed, level)  # the same image resampling, of per-image differences


# FID bootstraps run BLAS on one thread. Their 128x128 products are too small for threads to pay, and on a busy
# machine (training beside the eval) OpenBLAS's spinning threads fight the other processes: measured on this 2-core
# CPU with two trainings running, 1,000 paired resamples took 16 s on one thread and 244 s on OpenBLAS's default
# (niced, as a background `bench/compare_runs.py` is), 2.7x unniced.
_one_blas_thread = threadpool_limits.wrap(limits=1, user_api="blas")


def _root(cov: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(cov)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class _Reference:
    """The fixed reference side of a Frechet distance, prepared once: its mean, covariance trace and the square root
    of its covariance. The trace term then uses eigenvalues of Sr^1/2 Sg Sr^1/2 (equal to those of Sg^1/2 Sr Sg^1/2),
    so each resample costs one covariance and one symmetric eigvalsh."""

    def __init__(self, real: np.ndarray):
        real = np.asarray(real, np.float64)
        self.mu, s_r = real.mean(0), np.cov(real, rowvar=False)
        self.root, self.trace = _root(s_r), np.trace(s_r)

    def fid(self, gen: np.ndarray) -> float:
        mu_g, s_g = gen.mean(0), np.cov(gen, rowvar=False)
        cross = np.linalg.eigvalsh(self.root @ s_g @ self.root)
        return float(((mu_g - self.mu) ** 2).sum() + np.trace(s_g) + self.trace - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


@_one_blas_thread
def fid_ci(gen: np.ndarray, real: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
           level: float = LEVEL) -> tuple[float, float]:
    """Bias-shifted percentile interval for features.frechet_distance(gen, real) under resampling of `gen`'s rows
    (module docstring: why shifted)."""
    gen, ref = np.asarray(gen, np.float64), _Reference(real)
    rng = np.random.default_rng(seed)
    n = gen.shape[0]
    full = ref.fid(gen)
    out = np.array([ref.fid(gen[rng.integers(0, n, size=n)]) for _ in range(resamples)])
    return _bounds(out - (out.mean() - full), level)


@_one_blas_thread
def paired_fid_difference_ci(gen_a: np.ndarray, gen_b: np.ndarray, real: np.ndarray, resamples: int = RESAMPLES,
                             seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Interval for FID(a) - FID(b) against one reference, where row i of a and of b are images of the same prompt
    and seed (two rows of `nitrofusion eval`): one resample draws image indices once for both, as
    paired_difference_ci does for alignment, so what the rows share (the prompts drawn, a hard seed) cancels out.
    Bias-shifted like fid_ci: the duplication bias of a resample is nearly the same on both sides, and what is
    left is taken out. Far tighter than asking whether the rows' own FID intervals overlap, which is the right
    question only for independent sets."""
    a, b = np.asarray(gen_a, np.float64), np.asarray(gen_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired rows need the same images: {a.shape} vs {b.shape}")
    ref = _Reference(real)
    rng = np.random.default_rng(seed)
    n = a.shape[0]
    full = ref.fid(a) - ref.fid(b)
    out = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, size=n)
        out[i] = ref.fid(a[idx]) - ref.fid(b[idx])
    return _bounds(out - (out.mean() - full), level)


# The eval set's object cells: on the shapes16 models nearly every miss is a small striped or checkered object
# (docs/training.md, round 10), so comparisons split alignment by these.
FILL_CELLS = [(size, fill) for size in ("small", "large") for fill in ("solid", "striped", "checkered")]


def fill_cells(hits, attrs) -> list[str]:
    """Alignment per cell, in FILL_CELLS' order, as table cells with their 95% intervals:
    `hits[i]` is image i's pass, `attrs[i]` its prompt's Attributes (size, fill); an empty cell reads ''."""
    out = []
    for size, fill in FILL_CELLS:
        sub = [h for h, a in zip(hits, attrs, strict=True) if a.size == size and a.fill == fill]
        out.append(cell(sum(sub) / len(sub), proportion_ci(sub), 100, unit="%") if sub else "")
    return out


def cell(value: float, ci, scale: float = 1.0, fmt: str = ".1f", unit: str = "") -> str:
    """`63.0% [60.9, 65.1]`: the value, then its interval when there is one."""
    text = f"{value * scale:{fmt}}{unit}"
    if ci is None or any(np.isnan(c) for c in ci):
        return text
    return f"{text} [{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


__all__ = ["FILL_CELLS", "RESAMPLES", "cell", "fid_ci", "fill_cells", "paired_difference_ci", "paired_fid_difference_ci", "proportion_ci"]
