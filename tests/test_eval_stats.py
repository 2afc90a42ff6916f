"""Bootstrap intervals for `nitrofusion eval`'s rows (trainer/eval_stats.py), on small inputs with known answers."""

import numpy as np
import pytest

from trainer.eval_stats import cell, fid_ci, proportion_ci
from trainer.features import frechet_distance


def test_proportion_interval_covers_the_truth_and_shrinks_with_n():
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 400, 1600):
        hits = rng.random(n) < 0.3
        lo, hi = proportion_ci(hits)
        assert lo <= 0.3 <= hi, (n, lo, hi)
        assert lo <= hits.mean() <= hi
        widths.append(hi - lo)
        # The binomial interval's half-width is ~1.96 sqrt(p (1 - p) / n): the bootstrap must agree to ~15%.
        assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.3 * 0.7 / n), rel=0.15), n
    assert widths[0] > 1.7 * widths[1] > 1.7 * 1.7 * widths[2]  # ~1/sqrt(n): halves per 4x images


def test_proportion_interval_is_deterministic_and_degenerate_at_0_and_1():
    hits = np.arange(50) % 3 == 0
    assert proportion_ci(hits) == proportion_ci(hits)  # fixed seed
    assert proportion_ci(hits, seed=1) != proportion_ci(hits)
    assert proportion_ci(np.ones(20)) == (1.0, 1.0) and proportion_ci(np.zeros(20)) == (0.0, 0.0)


def test_fid_interval_brackets_the_estimate_and_shrinks_with_n():
    """Generated features shifted by a known offset from the reference's distribution: the interval holds the
    full-set FID, and quartering its width takes ~16x the images (here 4x: about half)."""
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(8, 8)) / 3
    real = rng.normal(size=(4000, 8)) @ mix
    shift = np.full(8, 0.5)  # true FID = |shift|^2 = 2.0 (same covariance)
    widths = []
    for n in (250, 1000):
        gen = rng.normal(size=(n, 8)) @ mix + shift
        fid = frechet_distance(gen, real)
        lo, hi = fid_ci(gen, real, resamples=300)
        assert lo <= fid <= hi and lo <= 2.0 <= hi + 0.05, (n, lo, fid, hi)
        widths.append(hi - lo)
    assert widths[0] > 1.6 * widths[1]


def test_cells_read_as_value_then_interval():
    assert cell(0.63, (0.609, 0.651), 100, unit="%") == "63.0% [60.9, 65.1]"
    assert cell(38.35, (36.2, 40.91), fmt=".2f") == "38.35 [36.20, 40.91]"
    assert cell(0.5, None, 100, unit="%") == "50.0%"
