"""Bootstrap intervals for `nitrofusion eval`'s rows (trainer/eval_stats.py), on small inputs with known answers."""

import numpy as np
import pytest

from trainer.eval_stats import cell, fid_ci, paired_difference_ci, paired_fid_difference_ci, proportion_ci
from trainer.features import frechet_distance

from .helpers import load_script


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


def test_paired_difference_is_tighter_than_the_rows_own_intervals_and_sees_a_small_gain():
    """Two rows over the same 400 images that mostly pass or fail together, B fixing 16 of A's misses: their own
    intervals overlap, the paired interval of B - A excludes 0. Identical rows give exactly 0."""
    rng = np.random.default_rng(3)
    a = rng.random(400) < 0.7
    b = a.copy()
    b[np.flatnonzero(~a)[:16]] = True  # +4 points
    lo_a, hi_a = proportion_ci(a)
    lo_b, hi_b = proportion_ci(b)
    assert lo_b < hi_a  # the rows' own intervals overlap
    lo, hi = paired_difference_ci(b, a)
    assert 0 < lo < 0.04 < hi < 0.07
    assert paired_difference_ci(a, a) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_difference_ci(a, b[:10])


def test_paired_fid_difference_sees_a_small_shift_that_the_rows_own_intervals_do_not():
    """Two rows of the same 600 images (row i of each from one prompt and seed: here one shared per-image draw),
    the second moved by a small known offset. Their own FID intervals overlap; the paired interval of the
    difference excludes 0 and holds the full sets' difference. Identical rows give exactly 0."""
    rng = np.random.default_rng(5)
    mix = rng.normal(size=(8, 8)) / 3
    real = rng.normal(size=(3000, 8)) @ mix
    shared = rng.normal(size=(600, 8)) @ mix + 0.3  # what both rows get from their prompts and seeds
    a = shared + rng.normal(size=(600, 8)) * 0.05
    b = shared + 0.03 + rng.normal(size=(600, 8)) * 0.05  # further from the reference: a larger FID
    fa, fb = frechet_distance(a, real), frechet_distance(b, real)
    lo_a, hi_a = fid_ci(a, real, resamples=300)
    lo_b, hi_b = fid_ci(b, real, resamples=300)
    assert fb > fa and lo_b < hi_a  # the rows' own intervals overlap
    lo, hi = paired_fid_difference_ci(b, a, real, resamples=300)
    assert 0 < lo <= fb - fa <= hi, (lo, fb - fa, hi)
    assert paired_fid_difference_ci(a, a, real, resamples=50) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same images"):
        paired_fid_difference_ci(a, b[:10], real)


def test_fid_bootstraps_run_blas_on_one_thread_and_restore_it(monkeypatch):
    # Each resample's 128x128 products are too small for BLAS threads; on a busy machine they cost 3-15x
    # (trainer/eval_stats._one_blas_thread). Seen from inside the resampling loop, BLAS has one thread.
    from threadpoolctl import threadpool_info, threadpool_limits

    from trainer import eval_stats

    def blas_threads():
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    seen, fid = [], eval_stats._Reference.fid
    monkeypatch.setattr(eval_stats._Reference, "fid", lambda self, gen: (seen.append(blas_threads()), fid(self, gen))[1])
    rng = np.random.default_rng(0)
    a, b, real = (rng.normal(size=(60, 4)) for _ in range(3))
    with threadpool_limits(limits=2, user_api="blas"):  # the caller's setting, whatever OMP_NUM_THREADS says
        assert blas_threads() == {2}
        fid_ci(a, real, resamples=5)
        paired_fid_difference_ci(a, b, real, resamples=5)
        assert blas_threads() == {2}  # and it is back afterwards
    assert seen and all(s == {1} for s in seen), seen[:3]


def test_target_lines_say_met_only_beyond_the_interval():
    """EVAL.md's targets: 4 steps vs 1 step and the full method vs the control, from the rows' per-image hits."""
    from trainer.evaluate import CONTROL_1, Result, Row, target_lines

    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.7

    def result(name, hits, fid):
        hits = [bool(h) for h in hits]
        return Result(Row(name, "student", "x", 1), 400, float(np.mean(hits)), {}, fid, 0.0,
                      proportion_ci(hits), (fid - 5, fid + 5), hits)

    better = base.copy()
    better[np.flatnonzero(~base)[:20]] = True
    teacher = result("teacher", base, 40.0)
    rows = {r.row.name: r for r in (result("NitroFusion 1 step", better, 45.0), result("NitroFusion 4 steps", base, 44.0),
                                    result("one-step init", base, 60.0), result(CONTROL_1, base, 46.0))}
    text = "\n".join(target_lines(rows, teacher))
    assert "4-step alignment >= the 1-step figure: **" in text and "-5.0 points [" in text
    control = next(line for line in text.splitlines() if "control, 1 step" in line)
    assert control.endswith("(met)") and "+5.0 points [" in control
    rows[CONTROL_1] = result(CONTROL_1, better, 46.0)  # the same images: no gain, FID intervals overlap
    control = next(line for line in target_lines(rows, teacher) if "control, 1 step" in line)
    assert control.endswith("(not met)") and "+0.0 points [+0.0, +0.0]" in control
    # With per-image features the FID verdict is paired: the same images a little further from the reference in
    # the control are a gain beyond the interval though the rows' own intervals (+-5 here) overlap.
    feats_rng = np.random.default_rng(7)
    reference = feats_rng.normal(size=(1000, 4))
    mine = feats_rng.normal(size=(400, 4)) + 0.2
    rows["NitroFusion 1 step"].features, rows["NitroFusion 1 step"].reference = mine, reference
    rows[CONTROL_1].features, rows[CONTROL_1].reference = mine + 0.1, reference
    control = next(line for line in target_lines(rows, teacher) if "control, 1 step" in line)
    assert control.endswith("(met)") and "(paired) (met)" in control, control
    rows[CONTROL_1].features = mine.copy()  # the same features: no FID gain either
    control = next(line for line in target_lines(rows, teacher) if "control, 1 step" in line)
    assert control.endswith("(not met)") and "[+0.00, +0.00] (paired)" in control, control


def test_compare_runs_pairs_each_variant_with_the_reference_row_by_row(tmp_path):
    """bench/compare_runs.py reads eval/<row>.json of each work folder: a variant that fixes 20 of the reference's
    400 misses shows +5.0 points with a paired interval above 0; rows without per-image hits get no difference."""
    import json


    rng = np.random.default_rng(1)
    base = rng.random(400) < 0.6
    better = base.copy()
    better[np.flatnonzero(~base)[:20]] = True

    def write(work, name, hits):
        (work / "eval").mkdir(parents=True, exist_ok=True)
        result = {"alignment": 0.5, "alignment_ci": None, "fid": 40.0, "fid_ci": [35.0, 45.0], "hits": None}
        if hits is not None:
            result.update(alignment=float(np.mean(hits)), alignment_ci=list(proportion_ci(hits)),
                          hits=[bool(h) for h in hits])
        (work / "eval" / f"{name}.json").write_text(json.dumps({"key": {"row": {"name": name}}, "result": result}))

    write(tmp_path / "ref", "NitroFusion 1 step", base)
    write(tmp_path / "var", "NitroFusion 1 step", better)
    write(tmp_path / "ref", "NitroFusion 4 steps", base)
    write(tmp_path / "var", "NitroFusion 4 steps", None)
    write(tmp_path / "ref", "teacher (25 steps, guidance 3)", better)  # a variant with a teacher of its own
    write(tmp_path / "var", "teacher (25 steps, guidance 3)", base)
    write(tmp_path / "ref", "held-out: NitroFusion 1 step", better)  # the held-out rows are paired too
    write(tmp_path / "var", "held-out: NitroFusion 1 step", base)
    mod = load_script("bench/compare_runs.py")
    lines = mod.table(("ctrl", tmp_path / "ref"), [("mm", tmp_path / "var")])
    held = next(line for line in lines if line.startswith("| mm | held-out: NitroFusion 1 step"))
    assert float(held.split("| -5.0 [")[1].split(",")[1].split("]")[0]) < 0
    one = next(line for line in lines if line.startswith("| mm | NitroFusion 1 step"))
    lo = float(one.split("| +5.0 [")[1].split(",")[0])
    assert lo > 0
    teacher = next(line for line in lines if line.startswith("| mm | teacher"))
    assert float(teacher.split("| -5.0 [")[1].split(",")[1].split("]")[0]) < 0
    four = next(line for line in lines if line.startswith("| mm | NitroFusion 4 steps"))
    assert "|  |" in four
    with pytest.raises(SystemExit, match="NAME=WORK_DIR"):
        mod.main(["--ref", str(tmp_path)])


def test_compare_runs_pairs_fid_over_one_reference_up_to_thread_noise_only():
    """Two evals of one reference set at 1 and 2 CPU threads differ by ~1e-5 in the features: still one reference,
    so the FID difference is paired; a different reference set is not, and gets no difference."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(300, 8))
    base = {"fid": 5.0, "features": rng.normal(size=(300, 8)), "reference": ref}
    var = {"fid": 6.0, "features": base["features"] + 0.3, "reference": ref + 1e-5}
    mod = load_script("bench/compare_runs.py")
    assert mod.fid_difference(var, base).startswith("+1.00 [")
    assert mod.fid_difference({**var, "reference": rng.normal(size=(300, 8))}, base) == ""
    assert mod.fid_difference({**var, "reference": ref[:200]}, base) == ""


def test_pick_run_prefers_alignment_then_fid_and_refuses_a_folder_without_a_model(tmp_path, capsys):
    """bench/pick_run.py's rule: the lowest FID among runs within the slack of the best alignment. A run far behind
    on alignment is not picked for its FID; inside the slack FID decides."""
    mod = load_script("bench/pick_run.py")
    scores = {"a": {"alignment": 0.78, "fid": 45.0}, "b": {"alignment": 0.77, "fid": 40.0},
              "c": {"alignment": 0.70, "fid": 30.0}}
    assert mod.pick(scores, alignment_slack=2.0) == "b"
    assert mod.pick(scores, alignment_slack=0.5) == "a"
    assert mod.pick(scores, alignment_slack=10.0) == "c"
    assert mod.main(["--run", f"x={tmp_path}"]) == 2
    assert "exported model" in capsys.readouterr().err


def test_pick_run_table_pairs_each_run_against_the_first_on_the_same_images():
    """bench/pick_run.py's table: the first run has no paired cell; a later run's is its alignment minus the first's
    (sign included) with the interval of per-image differences, so misses both runs share cancel. Here b draws the
    first run's hits plus 20 more of 400: +5.0 points, and every resample of the differences is positive."""
    mod = load_script("bench/pick_run.py")
    rng = np.random.default_rng(0)
    a = rng.random(400) < 0.8
    b = a.copy()
    b[np.flatnonzero(~a)[:20]] = True
    scores = {name: {"alignment": float(h.mean()), "alignment_ci": (0.0, 1.0), "hits": h, "fid": 30.0,
                     "fid_ci": (25.0, 35.0)} for name, h in (("a", a), ("b", b), ("a_again", a))}
    lines = mod.table(scores, steps=4)
    assert lines[0].startswith("| run | 4-step alignment | vs a (paired) |")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert cells[0][2] == ""
    assert cells[1][2].startswith("+5.0 [+") and " -" not in cells[1][2]
    assert cells[2][2] == "+0.0 [+0.0, +0.0]"
    assert [c[4] for c in cells] == ["", "", ""]  # no per-image features kept: no paired FID cell


def test_pick_run_table_pairs_alignment_and_fid_against_a_chosen_run():
    """--ref b: the table pairs against b, not the first run. With per-image features kept, the FID cell is the
    run's FID minus b's with the paired interval: a's features are b's shifted along one axis, so a's FID is higher
    by a margin every resample sees, and b against itself would read +0.00 (it has no cell: it is the reference)."""
    mod = load_script("bench/pick_run.py")
    from trainer.features import frechet_distance

    rng = np.random.default_rng(1)
    real = rng.normal(size=(300, 6))
    fb = rng.normal(size=(300, 6))
    fa = fb + np.array([1.0, 0, 0, 0, 0, 0])
    hits = rng.random(300) < 0.9
    scores = {name: {"alignment": float(hits.mean()), "alignment_ci": (0.0, 1.0), "hits": hits,
                     "fid": frechet_distance(f, real), "fid_ci": (0.0, 99.0), "features": f, "reference": real}
              for name, f in (("a", fa), ("b", fb))}
    lines = mod.table(scores, steps=1, ref="b")
    assert lines[0] == "| run | 1-step alignment | vs b (paired) | shapes-FID | vs b (paired) |"
    cells = {c[0]: c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert cells["b"][2] == cells["b"][4] == ""
    assert cells["a"][2] == "+0.0 [+0.0, +0.0]"
    diff = scores["a"]["fid"] - scores["b"]["fid"]
    assert diff > 0.5 and cells["a"][4].startswith(f"{diff:+.2f} [+")


def test_pick_run_refuses_a_reference_that_is_not_a_run(tmp_path, capsys):
    mod = load_script("bench/pick_run.py")
    model = tmp_path / "m"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    assert mod.main(["--run", f"x={model}", "--ref", "y"]) == 2
    assert "--ref 'y'" in capsys.readouterr().err


def test_compare_runs_by_fill_splits_each_rows_hits_by_object_size_and_fill(tmp_path):
    """bench/compare_runs.py --by-fill: each row's alignment per (size, fill) cell, from its per-image hits and the
    prompts' attributes in the eval's order; a cell whose images all miss reads 0.0%, the teacher row comes first,
    and a folder without a config is a clear error."""
    import json

    from trainer.shapes import Attributes

    attrs = [Attributes(size=("small", "large")[i % 2], colour="red", fill=("solid", "striped", "checkered")[i % 3],
                        shape="circle", position="center", background="blue") for i in range(60)]
    hits = [not (a.size == "small" and a.fill == "striped") and i % 10 != 3 for i, a in enumerate(attrs)]
    (tmp_path / "eval").mkdir()
    for name in ("NitroFusion 1 step", "teacher (25 steps, guidance 3)"):
        result = {"alignment": float(np.mean(hits)), "alignment_ci": None, "fid": 40.0, "fid_ci": None,
                  "hits": hits}
        (tmp_path / "eval" / f"{name}.json").write_text(
            json.dumps({"key": {"row": {"name": name, "split": "train"}}, "result": result}))
    mod = load_script("bench/compare_runs.py")
    seen = []
    lines = mod.fill_table([("a", tmp_path)], attributes=lambda w, split, n: seen.append((split, n)) or attrs)
    assert seen == [("train", 60)]  # drawn once for both rows of the folder
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[2:] == ["small solid", "small striped", "small checkered", "large solid", "large striped",
                          "large checkered"]
    assert lines[2].startswith("| a | teacher") and lines[3].startswith("| a | NitroFusion 1 step")
    cells = [c.strip() for c in lines[3].strip("|").split("|")][2:]
    from trainer.eval_stats import FILL_CELLS

    expected = {(s, f): np.mean([h for h, a in zip(hits, attrs) if (a.size, a.fill) == (s, f)]) for s, f in FILL_CELLS}
    assert [float(c.split("%")[0]) for c in cells] == pytest.approx([100 * expected[c] for c in FILL_CELLS], abs=0.05)
    assert cells[1].startswith("0.0%")
    with pytest.raises(SystemExit, match="train_config.json"):
        mod.eval_attributes(tmp_path, "train", 4)


def _unet_folder(folder, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text("{}\n")


def test_average_models_writes_the_weighted_mean_unet_into_a_copy_of_the_first_model(tmp_path, capsys):
    """bench/average_models.py: the output is the first model folder with its UNet replaced by the weighted mean of
    every given UNet (a model folder's unet/ or a bare UNet folder), float tensors only; integer tensors are the
    first's. Mismatched tensors and a bare UNet first are refused with a message, not a traceback."""
    import torch
    from safetensors.torch import load_file

    mod = load_script("bench/average_models.py")
    a, b = tmp_path / "a", tmp_path / "b"
    _unet_folder(a / "unet", {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([7])})
    (a / "model_index.json").write_text("{}\n")
    (a / "vae").mkdir()
    _unet_folder(b, {"w": torch.tensor([5.0, 10.0]), "n": torch.tensor([9])})
    out = tmp_path / "soup"
    assert mod.main(["--out", str(out), "--model", str(a), "--model", str(b), "--weight", "1", "--weight", "3"]) == 0
    sd = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sd["w"].tolist() == [4.0, 8.0] and sd["w"].dtype == torch.float32
    assert sd["n"].tolist() == [7]
    assert (out / "model_index.json").is_file() and (out / "vae").is_dir()
    # the inputs are untouched (the copy is not a hard link to the first model's weights)
    assert load_file(str(a / "unet" / "diffusion_pytorch_model.safetensors"))["w"].tolist() == [1.0, 2.0]

    bad = tmp_path / "bad"
    _unet_folder(bad, {"w": torch.zeros(3), "n": torch.tensor([1])})
    capsys.readouterr()
    assert mod.main(["--out", str(tmp_path / "x"), "--model", str(a), "--model", str(bad)]) == 2
    assert "has shape (3,)" in capsys.readouterr().err
    assert mod.main(["--out", str(tmp_path / "x"), "--model", str(b), "--model", str(a)]) == 2
    assert "exported model folder" in capsys.readouterr().err


def test_pick_run_takes_a_bare_unet_only_after_a_model(tmp_path, capsys):
    """A snapshot (bare UNet folder) borrows the first run's model, so it cannot be the first run."""
    import torch

    mod = load_script("bench/pick_run.py")
    _unet_folder(tmp_path / "snap", {"w": torch.zeros(1)})
    assert mod.main(["--run", f"s={tmp_path / 'snap'}"]) == 2
    assert "after one, NAME=UNET_DIR" in capsys.readouterr().err
