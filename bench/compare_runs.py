"""Compare stage-3 variants that `nitrofusion eval` scored on the same prompts and seeds: each row's alignment
and shapes-FID with its 95% interval, and each variant's alignment minus the reference's with the paired 95%
interval (trainer/eval_stats.py: resampling the same images for both, so a gain smaller than the rows' own
intervals can still be told apart from noise), and the same for shapes-FID where the eval kept per-image features
(eval/<row>.feats.npy, eval/reference_<split>.feats.npy). Reads each work folder's eval/<row>.json; run
`nitrofusion eval --work W --model W/model --no-ablations --images N` on each first.

`--by-fill` adds where the misses are: each row's alignment per object size and fill, with its interval. On the
shapes16 models nearly every miss is a small striped or checkered object (docs/training.md, round 10).

    python bench/compare_runs.py --ref control=/work/runs/ctrl --run mismatch=/work/runs/mm --run plain=/work/runs/p
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ROWS = ("one-step init", "NitroFusion 1 step", "NitroFusion 2 steps", "NitroFusion 3 steps", "NitroFusion 4 steps",
        # the held-out combinations, paired like the rest (their own prompts, seeds and FID reference)
        "held-out: teacher (25 steps)", "held-out: one-step init", "held-out: NitroFusion 1 step",
        "held-out: NitroFusion 4 steps")


def load_rows(work: Path) -> dict[str, dict]:
    """Row name -> cached result (with its `images` count and per-image `hits` when the eval kept them, and
    `features` / `reference` arrays when it kept those)."""
    import numpy as np

    out = {}
    for f in sorted((work / "eval").glob("*.json")):
        d = json.loads(f.read_text())
        r = d["result"]
        feats, ref = f.with_suffix(".feats.npy"), work / "eval" / f"reference_{d['key']['row'].get('split')}.feats.npy"
        if feats.is_file() and ref.is_file():
            r["features"], r["reference"] = np.load(feats), np.load(ref)
        r["split"] = d["key"]["row"].get("split", "train")
        out[d["key"]["row"]["name"]] = r
    return out


def row_order(rows: dict[str, dict]) -> list[str]:
    """The teacher's rows first (a variant with a teacher of its own gets them paired too), then ROWS."""
    return [*sorted(n for n in rows if n.startswith("teacher")), *ROWS]


def eval_attributes(work: Path, split: str, n: int) -> list:
    """The attributes of the first n prompts `nitrofusion eval` scored on `split`, from the work folder's config."""
    from trainer.config import TrainConfig
    from trainer.evaluate import eval_attributes as attributes_of
    from trainer.evaluate import run_config_file

    cfg_file = run_config_file(work)
    if cfg_file is None:
        raise SystemExit(f"compare_runs: error: {work} holds no train_config.json: --by-fill needs the run's config")
    return attributes_of(TrainConfig.load(cfg_file), split, n)


def fill_table(runs: list[tuple[str, Path]], attributes=eval_attributes) -> list[str]:
    """Alignment per (size, fill) cell for every row that kept per-image hits. `attributes(work, split, n)`: the
    prompts' attributes in the eval's order (drawn once per folder, split and count)."""
    from trainer.eval_stats import FILL_CELLS, fill_cells

    drawn: dict[tuple[Path, str, int], list] = {}
    lines = ["| variant | row | " + " | ".join(f"{size} {fill}" for size, fill in FILL_CELLS) + " |",
             "|---|---|" + "---|" * len(FILL_CELLS)]
    for name, work in runs:
        rows = load_rows(work)
        for row in row_order(rows):
            r = rows.get(row)
            if r is None or not r.get("hits"):
                continue
            key = (work, r["split"], len(r["hits"]))
            if key not in drawn:
                drawn[key] = attributes(*key)
            lines.append(f"| {name} | {row} | " + " | ".join(fill_cells(r["hits"], drawn[key])) + " |")
    return lines


def fid_difference(r: dict, base: dict) -> str:
    """r's FID minus base's with the paired interval, when both kept features against the same reference. "The
    same" up to float noise: one reference computed at 1 and at 2 CPU threads differs by ~1e-5 (measured), far
    under what moves an FID in its second decimal; another reference set differs by O(1)."""
    import numpy as np

    from trainer.eval_stats import paired_fid_difference_ci

    a, b = r.get("features"), base.get("features")
    if (a is None or b is None or a.shape != b.shape or r["reference"].shape != base["reference"].shape
            or not np.allclose(r["reference"], base["reference"], rtol=0, atol=1e-4)):
        return ""
    lo, hi = paired_fid_difference_ci(a, b, r["reference"])
    return f"{r['fid'] - base['fid']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def named(items: list[str]) -> list[tuple[str, Path]]:
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"compare_runs: error: expected NAME=WORK_DIR, got {item!r}")
        pairs.append((name, Path(path)))
    return pairs


def table(ref: tuple[str, Path], runs: list[tuple[str, Path]]) -> list[str]:
    from trainer.eval_stats import cell, paired_difference_ci

    ref_rows = load_rows(ref[1])
    lines = [f"| variant | row | alignment | vs {ref[0]} (paired) | shapes-FID | vs {ref[0]} (paired) |",
             "|---|---|---|---|---|---|"]
    for name, work in [ref, *runs]:
        rows = load_rows(work)
        for row in row_order(rows):
            r = rows.get(row)
            if r is None:
                continue
            diff, fdiff = "", ""
            base = ref_rows.get(row)
            if name != ref[0] and base:
                fdiff = fid_difference(r, base)
            if name != ref[0] and base and r.get("hits") and base.get("hits") and len(r["hits"]) == len(base["hits"]):
                lo, hi = paired_difference_ci(r["hits"], base["hits"])
                diff = f"{(r['alignment'] - base['alignment']) * 100:+.1f} [{lo * 100:+.1f}, {hi * 100:+.1f}]"
            lines.append(f"| {name} | {row} | {cell(r['alignment'], r.get('alignment_ci'), 100, unit='%')} | {diff} "
                         f"| {cell(r['fid'], r.get('fid_ci'), fmt='.2f')} | {fdiff} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="NAME=WORK_DIR: the reference variant (e.g. the control)")
    p.add_argument("--run", action="append", default=[], help="NAME=WORK_DIR, repeatable")
    p.add_argument("--by-fill", action="store_true", help="also each row's alignment per object size and fill")
    a = p.parse_args(argv)
    ref, runs = named([a.ref])[0], named(a.run)
    for _, w in [ref, *runs]:
        if not (w / "eval").is_dir():
            raise SystemExit(f"compare_runs: error: {w}/eval does not exist: run nitrofusion eval on it first")
    print("\n".join(table(ref, runs)))
    if a.by_fill:
        print()
        print("\n".join(fill_table([ref, *runs])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
