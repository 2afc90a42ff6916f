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
    p.add_argument("--linear", action="store_true",
                   help="also fit a fresh logistic regression per (t*, encoder level) on the same features, pooled "
                        "over space, dataset vs each source, on half the rows, and report its AUC on the other half")
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
    for need in (ckpt / "pool.safetensors", a.work / "nitro" / "unet" / "config.json"):
        if not need.is_file():
            print(f"error: {need} not found: --work must be a finished shapes stage-3 run", file=sys.stderr)
            return 2
    for s in a.student:
        if "=" not in s or not (Path(s.split("=", 1)[1]) / "config.json").is_file():
            print(f"error: --student {s}: expected NAME=UNET_DIR, a diffusers UNet folder", file=sys.stderr)
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
        # per source, per (t*, task), per head: each image's share of real-saying map cells and its mean logit
        said = {name: {k: {} for k in cols} for name in sets}
        score = {name: {k: {} for k in cols} for name in sets}
        for t in c.pool.timesteps:
            heads = [h for h in range(len(pool)) if pool.slot_of(h)[0] == t]
            views = Views.draw(gen, (n, *pairs.x0.shape[1:]), set(c.pool.tasks), c.pool.crop_fraction)
            for name, (x0, xc) in sets.items():
                for i in range(0, n, a.batch):
                    sl = slice(i, min(n, i + a.batch))
                    feats = encoder_features(encoder, x0[sl], t, rows(xc, sl), expand(uncond, len(x0[sl])),
                                             set(c.pool.tasks), sampler.alphas_cumprod, views.rows(sl))
                    for h, logit in pool(feats, heads).items():
                        k = (t, pool.slot_of(h)[2])
                        said[name][k].setdefault(h, []).append((logit > 0).float().mean(dim=(1, 2, 3)))
                        score[name][k].setdefault(h, []).append(logit.mean(dim=(1, 2, 3)))

    def share(name, k):
        return torch.stack([torch.cat(v).mean() for v in said[name][k].values()]).mean().item()

    def auc(name, k):
        """Per head, how often a dataset latent scores above one of `name`, averaged over heads."""
        return sum(rank_auc(torch.cat(score[first][k][h]), torch.cat(v)) for h, v in score[name][k].items()) / len(
            score[name][k])

    first = next(iter(sets))
    if a.linear:
        linear_table(a, sets, encoder, uncond, sampler, c.pool.timesteps, gen)
    print(f"\nShare of head outputs saying real ({n} latents a row; {len(pool)} heads, {pool.replicas} per slot, "
          f"all replicas; run: {a.work}); last column: AUC, how often a head scores a dataset latent above one of "
          f"the row's (0.5: it cannot tell them apart), mean over heads\n")
    print("| shown | " + " | ".join(f"t* {t}, {task}" for t, task in cols) + " | mean | AUC vs dataset |")
    print("|---|" + "---|" * (len(cols) + 2))
    for name in sets:
        vals = [share(name, k) for k in cols]
        aucs = [auc(name, k) for k in cols]
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {sum(vals) / len(vals):.2f} | "
              + ("" if name == first else f"{sum(aucs) / len(aucs):.2f}") + " |")
    print("\nAUC vs dataset latents per column (mean over that column's heads)\n")
    print("| shown | " + " | ".join(f"t* {t}, {task}" for t, task in cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name in list(sets)[1:]:
        print(f"| {name} | " + " | ".join(f"{auc(name, k):.2f}" for k in cols) + " |")
    return 0


def rank_auc(pos, neg) -> float:
    """P(a `pos` score > a `neg` score), ties counting half: 0.5 = the scores cannot rank the two sets."""
    return ((pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()).mean().item()


def pooled(encoder, x0, xc, uncond, t, sampler, views, batch):
    """Whole-image features with the prompt (global_cond's input), each level's channel means and stds over space.
    A second encoder pass beside the heads' (--linear only): it keeps the heads' table's noise draws as they were."""
    import torch

    from trainer.conditioning import expand, rows
    from trainer.discriminator import channel_stats, encoder_features

    out = []
    with torch.no_grad():
        for i in range(0, len(x0), batch):
            sl = slice(i, min(len(x0), i + batch))
            f = encoder_features(encoder, x0[sl], t, rows(xc, sl), expand(uncond, len(x0[sl])), {"global_cond"},
                                 sampler.alphas_cumprod, views.rows(sl))["global_cond"]
            out.append([channel_stats(v) for v in f])
    return [torch.cat(level) for level in zip(*out)]


def fit_auc(pos, neg, half: int) -> float:
    """L2-regularised logistic regression (LBFGS) on rows [:half] of each side; AUC on the rest."""
    import torch

    x = torch.cat([pos[:half], neg[:half]])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x = (x - mu) / sd
    y = torch.cat([torch.ones(half), torch.zeros(half)])
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + 1e-2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return rank_auc(((pos[half:] - mu) / sd) @ w, ((neg[half:] - mu) / sd) @ w)


def linear_table(a, sets, encoder, uncond, sampler, timesteps, gen) -> None:
    """Can the features tell the sources apart at all, given a head trained to convergence on a fixed set?"""
    from trainer.discriminator import Views

    names = list(sets)
    n = len(sets[names[0]][0])
    feats = {}
    for t in timesteps:
        views = Views.draw(gen, tuple(sets[names[0]][0].shape), set(), 0.5)
        for name, (x0, xc) in sets.items():
            feats[name, t] = pooled(encoder, x0, xc, uncond, t, sampler, views, a.batch)
    levels = len(feats[names[0], timesteps[0]])
    print(f"\nA logistic regression per encoder level on whole-image features with the prompt (channel means and "
          f"stds), fit on {n // 2} + {n // 2} rows, AUC on the other {n - n // 2} + {n - n // 2}: dataset vs the "
          f"row's source. Median and best of {levels} levels.\n")
    print("| shown | " + " | ".join(f"t* {t}: median / best" for t in timesteps) + " |")
    print("|---|" + "---|" * len(timesteps))
    for name in names[1:]:
        cells = []
        for t in timesteps:
            aucs = sorted(fit_auc(p, q, n // 2) for p, q in zip(feats[names[0], t], feats[name, t]))
            cells.append(f"{aucs[len(aucs) // 2]:.2f} / {aucs[-1]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
