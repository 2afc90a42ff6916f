"""What does a trained discriminator pool call real? The heads of a finished stage-3 run (W/nitro/checkpoint), each
shown the same number of latents from several sources at each of their t*: the dataset latents (what they
trained on as reals with nitro.real=data), the teacher's cached samples, and one-step outputs of students (the
run's own, its init, and any --student) from the cached teacher noises. Each cell is the share of head outputs
that say "real" (logit > 0), every head of that t* and task weighing the same, with one shared noise and crop
draw for all sources.

Why: with dataset latents as reals the heads leave chance (0.6) and the student does not improve (docs/training.md,
rounds 4, 7, 8). If the heads call the teacher's samples real, the student has a flaw they see and the teacher
lacks; if they call them fake as they call the student, the heads separate "made by the teacher" from "dataset",
which an L2 anchor on the teacher's samples cannot satisfy.

    python bench/head_probe.py --work W [--images 512] [--student control=W2/nitro/unet]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="a shapes stage-3 work folder (nitro/checkpoint/)")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", action="append", default=[], metavar="NAME=UNET_DIR", help="another student to show")
    a = p.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from nitrofusion.models import quiet_libraries
    from nitrofusion.sampler import LCMSampler
    from trainer.cache import PairCache, cache_batch, conditioning_of
    from trainer.conditioning import Conditioning, expand, rows
    from trainer.config import TrainConfig
    from trainer.discriminator import FrozenEncoder, HeadPool, Views, encoder_features
    from trainer.loop import make_accelerator
    from trainer.models import alphas_cumprod
    from trainer.nitro_step import student_x0
    from trainer.recipe import stage_dirs
    from trainer.source import ShapesSource

    quiet_libraries()
    ckpt = a.work / "nitro" / "checkpoint"
    if not (ckpt / "pool.safetensors").is_file():
        print(f"error: {ckpt}/pool.safetensors not found: --work must be a finished shapes stage-3 run",
              file=sys.stderr)
        return 2
    cfg = TrainConfig.load(ckpt / "train_config.json")
    c = cfg.nitro
    dirs = stage_dirs(a.work)
    source = ShapesSource(cfg, a.work)
    frozen = source.frozen("cpu")
    encoder = FrozenEncoder(frozen.teacher).eval()
    pool = HeadPool(c.pool, encoder.shapes(source.latent_size)).eval()
    pool.load_state_dict(load_file(str(ckpt / "pool.safetensors")))
    sampler = LCMSampler(alphas_cumprod(source.noise_schedule))

    gen = torch.Generator().manual_seed(a.seed)
    n = a.images
    with torch.no_grad():
        pairs = cache_batch(PairCache(dirs["cache"]), gen, n)
        cond = conditioning_of(pairs, frozen.text, "cpu")
        reals = source.real_pool(frozen, make_accelerator(cfg.run), dirs["cache"])
        pick = torch.randint(len(reals["prompts"]), (n,), generator=gen).tolist()
        real_cond = frozen.text([reals["prompts"][i] for i in pick])
        sets: dict[str, tuple[torch.Tensor, Conditioning]] = {
            "dataset latents (the heads' reals)": (reals["x0"][pick].float(), real_cond),
            "teacher samples (the cache)": (pairs.x0.float(), cond),
        }
        students = {"this run's student": a.work / "nitro" / "unet", "its one-step init": dirs["init"] / "unet"}
        students.update(dict(s.split("=", 1) for s in a.student))
        for name, folder in students.items():
            unet = UNet2DConditionModel.from_pretrained(folder).eval()
            outs = [student_x0(unet, sampler, pairs.noise[i:i + a.batch], rows(cond, slice(i, i + a.batch)), 1,
                               c.shift, []) for i in range(0, n, a.batch)]
            sets[f"{name}, 1 step"] = (torch.cat(outs).float(), cond)
        uncond = frozen.text([""])

        cols = [(t, task) for t in c.pool.timesteps for task in c.pool.tasks]
        table = {name: {} for name in sets}
        for t in c.pool.timesteps:
            heads = [h for h in range(len(pool)) if pool.slot_of(h)[0] == t]
            views = Views.draw(gen, (n, *pairs.x0.shape[1:]), set(c.pool.tasks), c.pool.crop_fraction)
            for name, (x0, xc) in sets.items():
                said = {task: [] for task in c.pool.tasks}
                for i in range(0, n, a.batch):
                    sl = slice(i, min(n, i + a.batch))
                    feats = encoder_features(encoder, x0[sl], t, rows(xc, sl), expand(uncond, len(x0[sl])),
                                             set(c.pool.tasks), sampler.alphas_cumprod, views.rows(sl))
                    for h, logit in pool(feats, heads).items():
                        said[pool.slot_of(h)[2]].append((logit > 0).float().mean().item())
                for task, v in said.items():
                    table[name][(t, task)] = sum(v) / len(v)

    print(f"\nShare of head outputs saying real ({n} latents a row; {len(pool)} heads, {pool.replicas} per slot, "
          f"all replicas; run: {a.work})\n")
    print("| shown | " + " | ".join(f"t* {t}, {task}" for t, task in cols) + " | mean |")
    print("|---|" + "---|" * (len(cols) + 1))
    for name, row in table.items():
        vals = [row[k] for k in cols]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
