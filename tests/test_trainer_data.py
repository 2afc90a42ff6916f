"""The shapes dataset (determinism, exact palette, held-out split), the prompt grammar, the detector, the config."""

import re

import numpy as np
import pytest

from trainer.config import TrainConfig, apply_overrides, recipe
from trainer.detector import detect
from trainer.models import build_tokenizer
from trainer.shapes import (
    COLOURS,
    PALETTE,
    ShapesDataset,
    all_combos,
    grammar_words,
    heldout_combos,
    prompt,
    split_combos,
)

PROMPT_RE = re.compile(
    r"^(small|large) (red|orange|yellow|green|blue|purple|white|black) ((striped|checkered) )?"
    r"(circle|square|triangle) (on the left|on the right|at the top|at the bottom|in the center), "
    r"(red|orange|yellow|green|blue|purple|white|black) background$"
)


def test_same_seed_same_images_other_seed_other_images():
    a, b, c = ShapesDataset(128, seed=0), ShapesDataset(128, seed=0), ShapesDataset(128, seed=1)
    for i in (0, 7, 123):
        assert np.array_equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any(not np.array_equal(a[i][0], c[i][0]) for i in range(5))


def test_pixels_are_exact_palette_colours_and_object_differs_from_background():
    palette = {tuple(v) for v in PALETTE.values()}
    ds = ShapesDataset(128, seed=3)
    for i in range(40):
        img, _, a = ds[i]
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        colours = {tuple(int(x) for x in px) for px in np.unique(img.reshape(-1, 3), axis=0)}
        assert colours == {PALETTE[a.colour], PALETTE[a.background]} and colours <= palette
        assert a.colour != a.background
    assert PALETTE["red"] == (220, 40, 40) and PALETTE["black"] == (25, 25, 25)


def test_heldout_split_is_about_ten_percent_fixed_and_never_trained():
    combos = all_combos()
    assert len(combos) == 8 * 3 * 7
    train, held = split_combos(0.1)
    assert len(held) == round(0.1 * len(combos)) == 17
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(combos)
    assert heldout_combos(0.1) == heldout_combos(0.1)  # fixed, not seed dependent
    # every colour, shape and background still trains
    assert {c for c, _, _ in train} == set(COLOURS) and {b for _, _, b in train} == set(COLOURS)
    tr, ho = ShapesDataset(64, seed=5, split="train"), ShapesDataset(64, seed=5, split="heldout")
    assert all(tr.attributes(i)[0].combo not in set(held) for i in range(500))
    assert all(ho.attributes(i)[0].combo in set(held) for i in range(100))


def test_prompt_grammar():
    ds = ShapesDataset(64, seed=0, split="all")
    seen_fill = set()
    for i in range(300):
        _, p, a = ds[i]
        m = PROMPT_RE.match(p)
        assert m, p
        assert p == prompt(a)
        seen_fill.add(a.fill)
        assert ("striped" in p or "checkered" in p) == (a.fill != "solid")
    assert seen_fill == {"solid", "striped", "checkered"}
    assert "large red striped circle on the left, blue background" in {
        prompt(type(a)("large", "red", "striped", "circle", "on the left", "blue"))}


def test_tokenizer_spells_grammar_words_as_single_tokens_and_still_tokenizes_anything():
    tok = build_tokenizer(32)
    for w in grammar_words():
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w
    ids = tok("a photo of a zebra!", add_special_tokens=False).input_ids  # outside the grammar: bytes
    assert len(ids) > 5 and tok.unk_token_id not in ids


@pytest.mark.parametrize("size, n", [(64, 200), (128, 60)])
def test_detector_reads_dataset_images_back(size, n):
    ds = ShapesDataset(size, seed=11, split="all")
    hits = {}
    for i in range(n):
        img, p, a = ds[i]
        for k, v in detect(img).matches(a).items():
            hits[k] = hits.get(k, 0) + int(v)
    assert hits["all"] == n, hits  # background, colour, shape and position on every real image
    assert min(hits.values()) >= 0.99 * n, hits  # size and fill too


def test_config_json_roundtrip_overrides_and_validation(tmp_path):
    cfg = apply_overrides(recipe("shapes"), ["teacher.optim.steps=12", "nitro.loss=hinge",
                                             "nitro.pool.tasks=[\"global_cond\"]"])
    assert cfg.teacher.optim.steps == 12 and cfg.nitro.pool.tasks == ("global_cond",)
    cfg.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    assert cfg.nitro.optim.steps == sum(cfg.nitro.phase_steps)
    with pytest.raises(ValueError, match="nitro.loss"):
        apply_overrides(cfg, ["nitro.loss=wasserstein"])
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(cfg, ["teacher.nope=1"])
    with pytest.raises(ValueError, match="nitro.pool.tasks"):
        apply_overrides(cfg, ["nitro.pool.tasks=[\"everything\"]"])


def test_learning_rate_warms_up_holds_then_decays_over_the_last_decay_steps():
    import torch

    from trainer.config import OptimConfig
    from trainer.loop import set_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    const = OptimConfig(steps=100, lr=1e-3, warmup=10)
    wsd = OptimConfig(steps=100, lr=1e-3, warmup=10, decay_steps=40)
    assert set_lr(opt, const, 4) == pytest.approx(5e-4) == set_lr(opt, wsd, 4)  # the same warm-up
    assert set_lr(opt, const, 99) == pytest.approx(1e-3)
    assert set_lr(opt, wsd, 59) == pytest.approx(1e-3)  # stable until the last 40 steps
    assert set_lr(opt, wsd, 80) == pytest.approx(5e-4)  # half-way down the cosine
    assert set_lr(opt, wsd, 100) == pytest.approx(0.0, abs=1e-12) and opt.param_groups[0]["lr"] == 0.0
    short = OptimConfig(steps=20, lr=1e-3, warmup=0, decay_steps=40)  # `--set ...steps=20`: the whole run decays
    assert set_lr(opt, short, 10) == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="decay_steps"):
        OptimConfig(decay_steps=-1)
