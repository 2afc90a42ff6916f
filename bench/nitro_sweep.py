"""Stage-3 (and stage-2) variants of a recipe, trained side by side from the same frozen stages and scored at
1 step: the sweep that chooses the shapes recipe's defaults. Built for a GPU, where a dozen of these small runs
fit in minutes; it runs on a CPU too (slowly).

  # pack the finished stages of a work folder (only what variants read: ~22 MB for shapes with --half)
  python bench/nitro_sweep.py pack --work outputs/shapes --to outputs/sweep_base --half
  python bench/nitro_sweep.py unpack --base outputs/sweep_base     # where it runs: fp32 again, latent pool
  # train every variant (in parallel), then score each snapshot
  python bench/nitro_sweep.py run --base outputs/sweep_base --out OUT [--variants base,global] [--iters 1500]
      [--every 250] [--parallel 8] [--train-timeout 300] [--images 2000] [--device cuda]

Each variant trains stage 3 for phase 1 only (`--iters` one-step iterations) in OUT/runs/<variant>/, whose
autoencoder, text and teacher stages are links to the base's; a variant that overrides cache.* or init.* also
rebuilds those stages in its folder. The student is saved every `--every` iterations (nitro.snapshot_every),
so a run cut off by the time limit is still scored up to where it got. Scores: the alignment and shapes-FID of
`nitrofusion eval` (same prompts, seeds and reference images), at 1 step, as OUT/sweep.md and OUT/sweep.json,
rewritten as results come in.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> overrides. Every run adds nitro.phase_steps=[iters] and the snapshot interval.
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "global": ['nitro.pool.tasks=["global_cond"]'],
    "disc4": ["nitro.disc_steps=4"],
    "lrd3e-3": ["nitro.lr_disc=3e-3"],
    "lrd2e-4": ["nitro.lr_disc=2e-4"],
    "refresh0.2%": ["nitro.pool.refresh_fraction=0.002"],
    "lr5e-6": ["nitro.optim.lr=5e-6"],
    "reg1": ["nitro.reg_weight=1"],
    "reg10": ["nitro.reg_weight=10"],
    "data": ["nitro.real=data"],
    "data+reg1": ["nitro.real=data", "nitro.reg_weight=1"],
    "data+disc4": ["nitro.real=data", "nitro.disc_steps=4"],
    "hinge": ["nitro.loss=hinge"],
    "reg3": ["nitro.reg_weight=3"],
    "reg10+disc4": ["nitro.reg_weight=10", "nitro.disc_steps=4"],
    "reg10+lr5e-5": ["nitro.reg_weight=10", "nitro.optim.lr=5e-5"],
    "data+reg10": ["nitro.real=data", "nitro.reg_weight=10"],
    "init4k+reg10": ["cache.num_pairs=4096", "init.optim.steps=2400", "nitro.reg_weight=10"],
    "t10-250": ["nitro.pool.timesteps=[10,250]"],
    "crop0.75": ["nitro.pool.crop_fraction=0.75"],
    "init4k": ["cache.num_pairs=4096", "init.optim.steps=2400"],
    "init4k+reg1": ["cache.num_pairs=4096", "init.optim.steps=2400", "nitro.reg_weight=1"],
    "init4k+data+disc4": ["cache.num_pairs=4096", "init.optim.steps=2400", "nitro.real=data", "nitro.disc_steps=4"],
}
BASE_INIT = "base-init"  # the pseudo-variant that scores the base's own one-step init
FROZEN = ("autoencoder", "text", "teacher")
PACK = {"autoencoder": ["vae"], "text": ["tokenizer", "text_encoder"], "teacher": ["unet"],
        # not teacher/latent_pool.pt (13 MB): `unpack` encodes it again where the sweep runs
        "cache": ["chunk_*.pt"], "init": ["unet"]}


def pack(work: Path, to: Path, half: bool = False) -> None:
    """Copy only what the variants read: each finished stage's output, DONE and train_config.json."""
    for stage, items in PACK.items():
        src, dst = work / stage, to / stage
        dst.mkdir(parents=True, exist_ok=True)
        for pattern in [*items, "DONE", "train_config.json"]:
            for p in src.glob(pattern):
                if p.is_dir():
                    shutil.copytree(p, dst / p.name, dirs_exist_ok=True)
                else:
                    shutil.copy2(p, dst / p.name)
    if half:  # halves what travels to a device; `unpack` restores fp32 (the runs see fp16-rounded weights)
        from safetensors.torch import load_file, save_file

        for f in to.glob("*/unet/*.safetensors"):
            save_file({k: v.half() for k, v in load_file(f).items()}, str(f))
    size = sum(p.stat().st_size for p in to.rglob("*") if p.is_file())
    print(f"packed {work} -> {to}: {size / 1e6:.1f} MB")


def unpack(base: Path, recipe_name: str) -> None:
    """Where the sweep runs: UNet weights back to fp32, and the teacher's latent pool encoded once (nitro.real=data
    reads it; encoding it here keeps the parallel runs from each encoding it)."""
    import torch
    from safetensors.torch import load_file, save_file

    from trainer.config import recipe
    from trainer.loop import make_accelerator
    from trainer.recipe import frozen_dirs
    from trainer.shapes import ShapesDataset
    from trainer.stage1 import latent_pool, load_frozen

    for f in base.glob("*/unet/*.safetensors"):
        state = load_file(f)
        if any(v.dtype == torch.float16 for v in state.values()):
            save_file({k: v.float() for k, v in state.items()}, str(f))
    cfg = recipe(recipe_name)
    acc = make_accelerator(cfg.run)
    data = ShapesDataset(cfg.data.image_size, cfg.data.seed, "train", cfg.data.heldout_fraction)
    latent_pool(cfg, base / "teacher", load_frozen(frozen_dirs(base), acc.device)["vae"], data, acc)
    print(f"unpacked {base}")


def prepare(base: Path, folder: Path, overrides: list[str]) -> list[str]:
    """The variant's work folder: links to the base's stages it does not change. Returns the stages to run."""
    folder.mkdir(parents=True, exist_ok=True)
    rebuild = {o.split(".", 1)[0] for o in overrides} & {"cache", "init"}
    if "cache" in rebuild:
        rebuild.add("init")  # a new cache means a new init
    for stage in (*FROZEN, "cache", "init"):
        link = folder / stage
        if stage not in rebuild and not link.exists():
            link.symlink_to((base / stage).resolve(), target_is_directory=True)
    return [s for s in ("cache", "init") if s in rebuild] + ["nitro"]


def child_env() -> dict[str, str]:
    """The environment of a training or scoring process: this tree importable, and (many runs share the machine)
    a few CPU threads each rather than one per core each."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))


def train(name: str, args, log) -> int:
    folder = args.out / "runs" / name
    overrides = VARIANTS[name]
    stages = prepare(args.base, folder, overrides)
    cmd = [sys.executable, "-m", "trainer", "--recipe", args.recipe, "--work", str(folder)]
    for s in stages:
        cmd += ["--stage", s]
    for o in [*overrides, f"nitro.phase_steps=[{args.iters}]", f"nitro.snapshot_every={args.every}",
              f"nitro.optim.checkpoint_every={10**9}", f"run.device={args.device}",
              f"run.mixed_precision={args.precision}", *args.set]:
        cmd += ["--set", o]
    env = child_env()
    t0 = time.monotonic()
    with open(folder / "train.log", "w") as f:
        try:
            rc = subprocess.run(cmd, check=False, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                timeout=args.train_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    log(f"[sweep] {name}: trained (exit {rc}, {time.monotonic() - t0:.0f} s)")
    return rc


def disc_loss(folder: Path, start: int, end: int) -> float | None:
    """Mean loss_d over logged iterations in (start, end]: 2 ln 2 = 1.386 is a discriminator at chance."""
    path = folder / "nitro" / "metrics.csv"
    if not path.is_file():
        return None
    vals = [float(r["loss_d"]) for r in csv.DictReader(path.open()) if start < int(r["step"]) <= end]
    return round(statistics.mean(vals), 3) if vals else None


class Scorer:
    """Alignment and shapes-FID at 1 step on the eval set of `nitrofusion eval` (built once, shared)."""

    def __init__(self, args):
        from trainer.config import recipe
        from trainer.evaluate import eval_set, real_images
        from trainer.features import extract, load_feature_net

        self.cfg = recipe(args.recipe)
        self.args = args
        self.net = load_feature_net()
        self.prompts, self.attrs, self.noise = eval_set(self.cfg, "train", args.images)
        self.real = extract(self.net, real_images(self.cfg, "train", args.images))

    def score(self, work: Path, unet_rel: str) -> dict:
        from trainer.evaluate import Row, alignment, generate
        from trainer.features import extract, frechet_distance

        row = Row(unet_rel, "student", unet_rel, 1)
        images = generate(row, self.cfg, work, self.args.model, {}, self.prompts, self.noise, device=self.args.device)
        align, per = alignment(images, self.attrs)
        return {"alignment": round(align, 4), "fid": round(frechet_distance(extract(self.net, images), self.real), 2),
                **{k: round(v, 4) for k, v in per.items()}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("--work", type=Path, default=ROOT / "outputs" / "shapes")
    pk.add_argument("--to", type=Path, default=ROOT / "outputs" / "sweep_base")
    pk.add_argument("--half", action="store_true", help="store the UNets in fp16 (unpack restores fp32)")
    up = sub.add_parser("unpack")
    up.add_argument("--base", type=Path, default=ROOT / "outputs" / "sweep_base")
    up.add_argument("--recipe", default="shapes")
    r = sub.add_parser("run")
    r.add_argument("--base", type=Path, default=ROOT / "outputs" / "sweep_base")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--model", type=Path, default=ROOT / "models" / "default",
                   help="exported folder whose VAE and text encoder the scored students run with")
    r.add_argument("--recipe", default="shapes")
    r.add_argument("--variants", default=",".join(VARIANTS))
    r.add_argument("--iters", type=int, default=1500)
    r.add_argument("--every", type=int, default=250)
    r.add_argument("--parallel", type=int, default=8)
    r.add_argument("--train-timeout", type=float, default=300)
    r.add_argument("--score-timeout", type=float, default=150)
    r.add_argument("--images", type=int, default=2000)
    r.add_argument("--device", default="cuda")
    r.add_argument("--precision", default="no", help="run.mixed_precision (no: fp32, as the CPU recipe)")
    r.add_argument("--set", action="append", default=[], help="an override for every variant (e.g. smaller sizes)")
    sc = sub.add_parser("score")  # internal: one variant's snapshots, in its own process
    sc.add_argument("--folder", type=Path, required=True)
    sc.add_argument("--base", type=Path, required=True)
    sc.add_argument("--model", type=Path, required=True)
    sc.add_argument("--recipe", default="shapes")
    sc.add_argument("--images", type=int, default=2000)
    sc.add_argument("--device", default="cuda")
    sc.add_argument("--every", type=int, default=250)
    sc.add_argument("--train-exit", type=int, default=0)
    args = p.parse_args()
    if args.cmd == "score":
        return score_folder(args)
    if args.cmd == "pack":
        pack(args.work, args.to, args.half)
        return 0
    if args.cmd == "unpack":
        unpack(args.base, args.recipe)
        return 0

    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"{msg} [{time.monotonic() - t0:.0f} s]", flush=True)

    def variant(name: str) -> list[dict]:
        rc = train(name, args, log) if name != BASE_INIT else 0
        folder = args.out / "runs" / name
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "score", "--folder", str(folder), "--base", str(args.base),
               "--model", str(args.model), "--recipe", args.recipe, "--images", str(args.images),
               "--device", args.device, "--every", str(args.every), "--train-exit", str(rc)]
        try:
            subprocess.run(cmd, check=False, cwd=ROOT, timeout=args.score_timeout, env=child_env())
        except subprocess.TimeoutExpired:
            log(f"[sweep] {name}: scoring cut off after {args.score_timeout:.0f} s")
        path = folder / "scores.json"
        return json.loads(path.read_text()) if path.is_file() else []

    results: list[dict] = []
    with ThreadPoolExecutor(args.parallel) as ex:
        for res in ex.map(variant, [BASE_INIT, *names]):
            results += res
            write(results, args)
    log(f"[sweep] done: {args.out / 'sweep.md'}")
    return 0


def score_folder(args) -> int:
    """One variant's snapshots (its own init first, when it rebuilt one), each appended to scores.json."""
    folder = args.folder
    name = folder.name
    if name == BASE_INIT:
        todo = [(0, args.base, "init/unet")]
    else:
        own_init = (folder / "init").is_dir() and not (folder / "init").is_symlink()
        todo = [(0, folder, "init/unet")] if own_init and (folder / "init" / "unet").is_dir() else []
        todo += sorted((int(d.name.removeprefix("unet_step")), folder, f"nitro/{d.name}")
                       for d in (folder / "nitro").glob("unet_step*") if d.is_dir())
    scorer = Scorer(args)
    out: list[dict] = []
    for it, work, rel in todo:
        t0 = time.monotonic()
        res = {"variant": name, "iteration": it, "train_exit": args.train_exit, **scorer.score(work, rel),
               "loss_d": disc_loss(folder, max(0, it - args.every), it) if it else None}
        out.append(res)
        (folder / "scores.json").write_text(json.dumps(out, indent=1) + "\n")
        print(f"[sweep] {name} @ {it}: alignment {res['alignment']:.3f}, FID {res['fid']:.2f}, loss_d {res['loss_d']} "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


def write(results: list[dict], args) -> None:
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    cols = ["variant", "iteration", "alignment", "fid", "loss_d", "colour", "shape", "position", "size", "fill"]
    head = (f"Stage-3 sweep, 1 step, {args.images} images per score, iterations of phase 1 "
            f"(`bench/nitro_sweep.py run --iters {args.iters} --every {args.every} --device {args.device}`). "
            "loss_d: mean discriminator loss over the preceding interval (2 ln 2 = 1.386 is chance).")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r[c]) for c in cols) + " |")
    lines += ["", "Overrides:", ""] + [f"- {n}: {' '.join(o) or '(recipe defaults)'}" for n, o in VARIANTS.items()]
    (args.out / "sweep.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
