"""Does the discriminator pool learn? Short stage-3 runs (phase 1 only) from a shapes run's init and cache, one
per variant, each reporting the sampled heads' accuracy on reals and on fakes (0.5 is chance) and loss_d
(2 ln 2 = 1.386 at chance for softplus) over the second half of its iterations. Issue 15: the pool sat at chance.

    python bench/pool_probe.py --work outputs/shapes                          # the built-in variants, 150 its
    python bench/pool_probe.py --work W --iters 300 --variant "disc x4=nitro.disc_steps=4"
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {
    "recipe": [],
    "heads summed": ["nitro.pool.reduce=sum"],
    "4 disc steps": ["nitro.disc_steps=4"],
    "refresh 0.1%": ["nitro.pool.refresh_fraction=0.001"],
    "no refresh": ["nitro.pool.refresh_fraction=0"],
    "disc lr 3e-3": ["nitro.lr_disc=3e-3"],
    "t* 10 only": ["nitro.pool.timesteps=[10]"],
}


def summarise(metrics: Path) -> dict[str, float]:
    rows = list(csv.DictReader(metrics.open()))
    tail = rows[len(rows) // 2:]
    mean = {k: sum(float(r[k]) for r in tail) / max(1, len(tail)) for k in ("acc_real", "acc_fake", "loss_d")}
    reg = [float(r["loss_reg"]) for r in tail if r.get("loss_reg") not in (None, "", "nan")]
    mean["loss_reg"] = sum(reg) / len(reg) if reg else float("nan")
    return mean


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--iters", type=int, default=150)
    p.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE]",
                   help="instead of the built-in variants")
    p.add_argument("--only", nargs="*", help="a subset of the built-in variants, by name")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every variant")
    a = p.parse_args(argv)

    from nitrofusion.models import quiet_libraries
    from trainer.config import TrainConfig, apply_overrides
    from trainer.loop import make_accelerator
    from trainer.recipe import stage_dirs
    from trainer.source import ShapesSource
    from trainer.stage3 import train_nitro

    quiet_libraries()
    variants = dict(VARIANTS)
    if a.variant:
        variants = {v.split("=", 1)[0]: v.split("=", 1)[1].split(";") for v in a.variant}
    if a.only:
        variants = {k: v for k, v in variants.items() if k in a.only}
    base = TrainConfig.load(a.work / "init" / "train_config.json")
    d = stage_dirs(a.work)
    results = {}
    for name, overrides in variants.items():
        cfg = apply_overrides(base, [*a.set, *overrides, f"nitro.phase_steps=[{a.iters}]", "nitro.optim.log_every=1"])
        folder = a.work / "probes" / "".join(c if c.isalnum() else "_" for c in name)
        t0 = time.monotonic()
        if not (folder / "unet").is_dir():
            train_nitro(cfg, folder, ShapesSource(cfg, a.work), d["init"] / "unet", d["cache"], make_accelerator(cfg.run))
        results[name] = {**summarise(folder / "metrics.csv"), "s": time.monotonic() - t0}
        r = results[name]
        print(f"{name:16s} acc_real {r['acc_real']:.3f} acc_fake {r['acc_fake']:.3f} loss_d {r['loss_d']:.3f} "
              f"loss_reg {r['loss_reg']:.4f} ({r['s']:.0f} s)", flush=True)
    print(f"\n| variant ({a.iters} iterations; second half) | acc real | acc fake | loss_d | L2 term |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['acc_real']:.3f} | {r['acc_fake']:.3f} | {r['loss_d']:.3f} | {r['loss_reg']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
