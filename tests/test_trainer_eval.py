"""`nitrofusion eval`: the Frechet distance, the frozen feature CNN, alignment, and the whole report on a tiny run."""

import json
import re

import numpy as np
import pytest
import torch

from trainer.config import recipe
from trainer.evaluate import ABLATIONS, CONTROLS, SEED0, alignment, eval_set, real_images, slug
from trainer.features import GROUPS, attribute_accuracy, extract, frechet_distance, load_feature_net
from trainer.recipe import run
from trainer.shapes import PALETTE, ShapesDataset

from .helpers import run_cli


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    cov_trace = np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    shift = np.arange(6.0)
    assert frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)  # same covariance
    # b = 2a: mean term |mu|^2, covariance term tr(S) + tr(4S) - 2 tr(2S) = tr(S)
    mu = a.mean(0)
    assert frechet_distance(a, 2 * a) == pytest.approx((mu**2).sum() + cov_trace, rel=1e-8)
    assert frechet_distance(a, 2 * a) == pytest.approx(frechet_distance(2 * a, a), rel=1e-9)


def test_committed_feature_net_reads_every_attribute():
    """The frozen CNN behind shapes-FID knows the dataset: near-perfect on images it never trained on."""
    net = load_feature_net()
    acc = attribute_accuracy(net, ShapesDataset(64, 0, "all"), range(123_000, 123_300))
    assert set(acc) == set(GROUPS)
    assert min(acc.values()) >= 0.95, acc


def test_shapes_fid_separates_real_from_blurred_images():
    """Independent dataset sets are close; the same images blurred (5x5 box, what a weak decoder does) are far."""
    cfg = recipe("shapes")
    net = load_feature_net()
    real = real_images(cfg, "train", 1000)
    other = np.stack([ShapesDataset(64, 0, "train")[7_000_000 + i][0] for i in range(1000)])
    x = torch.from_numpy(real).permute(0, 3, 1, 2).float()
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2, count_include_pad=False).round().byte()
    blurred = blurred.permute(0, 2, 3, 1).numpy()
    f_other = extract(net, other)
    floor = frechet_distance(f_other, extract(net, real))
    assert frechet_distance(f_other, extract(net, blurred)) > 2 * floor


def test_alignment_is_perfect_on_dataset_images_and_catches_a_wrong_colour():
    cfg = recipe("shapes")
    prompts, attrs, noise = eval_set(cfg, "train", 40)
    assert noise.shape == (40, 4, 8, 8)
    assert torch.equal(noise[3], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(SEED0 + 3))[0])
    data = ShapesDataset(64, 0, "train")
    from trainer.evaluate import EVAL_OFFSET

    images = np.stack([data[EVAL_OFFSET + i][0] for i in range(40)])
    assert [data[EVAL_OFFSET + i][1] for i in range(40)] == prompts
    score, per = alignment(images, attrs)
    assert score == 1.0 and all(v == 1.0 for v in per.values())
    # Repaint every background pixel of image 0 in another palette colour: background fails, the rest holds.
    bad = images.copy()
    bg = np.array(PALETTE[attrs[0].background], np.uint8)
    other = next(np.array(v, np.uint8) for k, v in PALETTE.items() if k not in (attrs[0].background, attrs[0].colour))
    bad[0][(bad[0] == bg).all(-1)] = other
    score, per = alignment(bad, attrs)
    assert score == pytest.approx(39 / 40) and per["background"] == pytest.approx(39 / 40)
    assert per["colour"] == 1.0


def test_heldout_eval_prompts_use_only_heldout_combinations():
    cfg = recipe("shapes")
    from trainer.shapes import heldout_combos

    _, attrs, _ = eval_set(cfg, "heldout", 50)
    assert {a.combo for a in attrs} <= heldout_combos(cfg.data.heldout_fraction)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = run(recipe("tiny"), root / "work", root / "model")
    return root, model


@pytest.mark.slow
def test_eval_cli_writes_report_grids_and_curves_and_student_rows_match_generate(tiny_trained, tmp_path):
    root, model = tiny_trained
    out = tmp_path / "EVAL.md"
    r = run_cli("eval", "--work", str(root / "work"), "--model", str(model), "--images", "8", "--out", str(out),
                timeout=600)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "%" in line]
    names = [line.split(" | ")[0][2:] for line in rows]
    assert names[0] == "dataset images (FID floor)"
    for expected in ["one-step init", "NitroFusion 1 step", "NitroFusion 4 steps", "held-out: NitroFusion 1 step",
                     *ABLATIONS]:
        assert expected in names, (expected, names)
    assert any(n.startswith("teacher (2 steps") for n in names)
    assert re.search(r"1-step alignment >= 95%: \*\*[\d.]+%\*\*", text)
    # Every row's alignment and shapes-FID carry their bootstrap interval: `63.0% [60.9, 65.1]`, `38.35 [..]`.
    for line in rows:
        cells = line.split(" | ")
        assert re.fullmatch(r"[\d.]+% \[[\d.]+, [\d.]+\]", cells[1]), line
        assert re.fullmatch(r"[\d.]+ \[[\d.]+, [\d.]+\]", cells[8]), line
    from PIL import Image

    for png in ["samples_dataset.png", "samples_nitrofusion_1_step.png"]:  # 8 images of 32 px in a row, 2x
        assert Image.open(tmp_path / "eval" / png).size == (8 * 34 * 2, 34 * 2), png
    compare = Image.open(tmp_path / "eval" / "compare.png")
    # dataset, 6 main rows, the ablation reference, the ablations, each control at 1 and 4 steps
    assert compare.height == 34 * 2 * (1 + 6 + 1 + len(ABLATIONS) + 2 * len(CONTROLS))
    assert Image.open(tmp_path / "eval" / "loss_curves.png").size[0] > 800
    # Per-image features are kept beside each row's cache, and the targets compare FID paired on them.
    assert np.load(root / "work" / "eval" / "nitrofusion_1_step.feats.npy").shape == (8, 128)
    assert np.load(root / "work" / "eval" / "reference_train.feats.npy").shape == (8, 128)
    control_line = next(line for line in text.splitlines() if "control, 1 step, better" in line)
    assert re.search(r"FID \*\*.*\*\*, [+-][\d.]+ \[[+-][\d.]+, [+-][\d.]+\] \(paired\) \((not )?met\)$", control_line), control_line
    # Each ablation trained its own stage-3 run with its switch set.
    for name in [*ABLATIONS, *CONTROLS]:
        saved = json.loads((root / "work" / "ablations" / slug(name) / "train_config.json").read_text())
        assert saved["nitro"]["phase_steps"] == ([1] if name in ABLATIONS else list(recipe("tiny").nitro.phase_steps))
    control = json.loads((root / "work" / "ablations" / slug(next(iter(CONTROLS))) / "train_config.json").read_text())
    assert control["nitro"]["adv_weight"] == 0
    single = json.loads((root / "work" / "ablations" / "single_head" / "train_config.json").read_text())
    assert single["nitro"]["pool"]["single_head"] is True
    # A student row's first image is exactly what `nitrofusion generate` makes with seed SEED0.
    grid = np.load(root / "work" / "eval" / "nitrofusion_2_steps.npy")
    prompt = eval_set(recipe("tiny"), "train", 1)[0][0]
    png = tmp_path / "one.png"
    g = run_cli("generate", "--model", str(model), "--backend", "torch", "--prompt", prompt, "--steps", "2", "--seed", str(SEED0),
                "--out", str(png))
    assert g.returncode == 0, g.stderr
    assert np.array_equal(np.asarray(Image.open(png).convert("RGB")), grid[0])
    # A second run reuses every row from the cache.
    again = run_cli("eval", "--work", str(root / "work"), "--model", str(model), "--images", "8", "--out",
                    str(out), timeout=600)
    assert again.returncode == 0 and "cached" in again.stdout + again.stderr
    assert out.read_text() == text  # the same report from the cache: features and all


def test_eval_cli_errors_are_one_line(tmp_path):
    r = run_cli("eval", "--work", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "holds no trained stages" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_eval_controls_only_trains_and_scores_the_control_and_no_ablation(tiny_trained, tmp_path):
    import shutil

    root, model = tiny_trained
    work = tmp_path / "work"
    shutil.copytree(root / "work", work, ignore=shutil.ignore_patterns("ablations", "eval"))
    out = tmp_path / "EVAL.md"
    r = run_cli("eval", "--work", str(work), "--model", str(model), "--images", "4", "--out", str(out),
                "--controls-only", timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (work / "ablations").iterdir()) == sorted(slug(n) for n in CONTROLS)
    names = [line.split(" | ")[0][2:] for line in out.read_text().splitlines() if line.startswith("| ") and "%" in line]
    assert not set(ABLATIONS) & set(names)
    assert [n for n in names if n.startswith(next(iter(CONTROLS)))] == [f"{next(iter(CONTROLS))}, 1 step",
                                                                      f"{next(iter(CONTROLS))}, 4 steps"]


def test_loss_figure_gets_a_dmd_panel_only_when_stage_3_logged_the_term(tmp_path):
    """The DMD term's loss and its fake score's are drawn when nitro/metrics.csv has them (a panel is 4 inches at
    100 dpi: 6 panels without the term, 7 with it)."""
    from PIL import Image

    from trainer.eval_plots import plot_losses

    widths = {}
    for dmd in (False, True):
        work = tmp_path / str(dmd)
        (work / "nitro").mkdir(parents=True)
        cols = ["step", "loss_g", "loss_d", "loss_reg"] + (["loss_dmd", "loss_fake"] if dmd else [])
        rows = [",".join(cols)] + [",".join(str(0.5 + 0.01 * i) if c != "step" else str(i) for c in cols)
                                   for i in range(1, 20)]
        (work / "nitro" / "metrics.csv").write_text("\n".join(rows) + "\n")
        plot_losses(work, work / "loss.png")
        widths[dmd] = Image.open(work / "loss.png").size[0]
    assert widths == {False: 2400, True: 2800}
