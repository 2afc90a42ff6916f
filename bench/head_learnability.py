"""Can a discriminator head learn to tell a student from the dataset when the target holds still? Heads trained
online, as stage 3 trains them, on FIXED frozen-encoder features: a finished shapes run's reals (dataset latents
when it ran with nitro.real=data, the teacher's samples otherwise) against its student's 1-step outputs (whole image
with the prompt, one t*), half the rows to train on and half held out.

Why: in stage 3 the heads sit at chance on fresh latents (AUC 0.51-0.54, bench/head_probe.py) while a converged
logistic regression on the same features separates the two (0.61-0.80). Stage 3 adds a moving student, redrawn
noise and crops, head resets and mixed step counts; this removes all of them and asks only whether a head kind and
an optimiser setting can learn the difference from mini-batches. Each cell is the held-out AUC after the updates
(median / best over the encoder's levels), beside the converged logistic regression (head_probe's `--linear`).

    python bench/head_learnability.py --work W [--images 2048] [--t-star 10] [--updates 500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# (name, lr, AdamW betas, rows per side per update), for both head kinds: the recipe's setting first
SETTINGS = [
    ("recipe: lr 1e-3, betas (0, 0.99), 16 rows", 1e-3, (0.0, 0.99), 16),
    ("lr 1e-4, betas (0.9, 0.99), 16 rows", 1e-4, (0.9, 0.99), 16),
    ("lr 1e-3, betas (0, 0.99), 128 rows", 1e-3, (0.0, 0.99), 128),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="a finished shapes stage-3 work folder")
    p.add_argument("--images", type=int, default=2048, help="latents per side (half to train on, half held out)")
    p.add_argument("--t-star", type=int, default=10)
    p.add_argument("--updates", type=int, default=500)
    p.add_argument("--batch", type=int, default=128, help="encoder batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--per-level", action="store_true",
                   help="only the patch head at 128 rows per update, each encoder level's AUC on its own line: which "
                        "levels carry the difference (for nitro.pool.levels)")
    a = p.parse_args(argv)
    if not (a.work / "nitro" / "unet" / "config.json").is_file():
        print(f"error: {a.work}/nitro/unet not found: --work must be a finished shapes stage-3 run", file=sys.stderr)
        return 2
    if a.images < 64:
        print("error: --images must be at least 64", file=sys.stderr)
        return 2

    import torch
    from diffusers import UNet2DConditionModel
    from head_probe import fit_auc, rank_auc

    from nitrofusion.models import quiet_libraries
    from nitrofusion.sampler import LCMSampler
    from trainer.cache import PairCache, cache_batch, conditioning_of
    from trainer.conditioning import expand, rows
    from trainer.config import PoolConfig, TrainConfig
    from trainer.discriminator import FrozenEncoder, Views, channel_stats, d_loss, encoder_features, make_head
    from trainer.loop import make_accelerator
    from trainer.models import alphas_cumprod
    from trainer.nitro_step import student_x0
    from trainer.recipe import stage_dirs
    from trainer.source import ShapesSource

    quiet_libraries()
    cfg = TrainConfig.load(a.work / "nitro" / "checkpoint" / "train_config.json")
    dirs = stage_dirs(a.work)
    source = ShapesSource(cfg, a.work)
    frozen = source.frozen("cpu")
    encoder = FrozenEncoder(frozen.teacher).eval()
    sampler = LCMSampler(alphas_cumprod(source.noise_schedule))
    gen = torch.Generator().manual_seed(a.seed)
    n = a.images
    uncond = frozen.text([""])
    with torch.no_grad():
        pairs = cache_batch(PairCache(dirs["cache"]), gen, n)
        cond = conditioning_of(pairs, frozen.text, "cpu")
        reals = source.real_pool(frozen, make_accelerator(cfg.run), dirs["cache"])
        pick = torch.randint(len(reals["prompts"]), (n,), generator=gen).tolist()
        real_x0, real_cond = reals["x0"][pick].float(), frozen.text([reals["prompts"][i] for i in pick])
        unet = UNet2DConditionModel.from_pretrained(a.work / "nitro" / "unet").eval()
        fake_x0 = torch.cat([student_x0(unet, sampler, pairs.noise[i:i + a.batch], rows(cond, slice(i, i + a.batch)),
                                        1, cfg.nitro.shift, []) for i in range(0, n, a.batch)]).float()
        views = Views.draw(gen, tuple(real_x0.shape), set(), 0.5)

        def levels(x0, xc):
            out = []
            for i in range(0, n, a.batch):
                sl = slice(i, min(n, i + a.batch))
                out.append(encoder_features(encoder, x0[sl], a.t_star, rows(xc, sl), expand(uncond, len(x0[sl])),
                                            {"global_cond"}, sampler.alphas_cumprod, views.rows(sl))["global_cond"])
            return [torch.cat(level).float() for level in zip(*out)]

        real_f, fake_f = levels(real_x0, real_cond), levels(fake_x0, cond)

    half = n // 2

    def online(kind: str, lr: float, betas, rows_per_side: int, level: int) -> float:
        torch.manual_seed(a.seed)
        pool_cfg = PoolConfig(head_kind=kind)
        c, side = real_f[level].shape[1], real_f[level].shape[-1]
        head = make_head(pool_cfg, c, side)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, betas=betas)
        g = torch.Generator().manual_seed(a.seed + 1)
        kw = {"learn": True} if kind == "stats" else {}
        for _ in range(a.updates):
            i = torch.randint(half, (rows_per_side,), generator=g)
            j = torch.randint(half, (rows_per_side,), generator=g)
            loss = d_loss({0: head(real_f[level][i], **kw)}, {0: head(fake_f[level][j], **kw)}, "softplus")
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return rank_auc(head(real_f[level][half:]).mean(dim=(1, 2, 3)),
                            head(fake_f[level][half:]).mean(dim=(1, 2, 3)))

    if a.per_level:
        print(f"\nHeld-out AUC per encoder level, the run's reals ({cfg.nitro.real}) vs its 1-step student ({a.work}), "
              f"t* {a.t_star}, whole image with the prompt, {a.updates} updates\n")
        print("| level | channels, side | patch head, lr 1e-3, 128 rows | converged logistic regression |")
        print("|---|---|---|---|")
        for lvl in range(len(real_f)):
            auc = online("patch", 1e-3, (0.0, 0.99), 128, lvl)
            lin = fit_auc(channel_stats(real_f[lvl]), channel_stats(fake_f[lvl]), half)
            print(f"| {lvl} | {real_f[lvl].shape[1]}, {real_f[lvl].shape[-1]} | {auc:.2f} | {lin:.2f} |", flush=True)
        return 0
    converged = sorted(fit_auc(channel_stats(r), channel_stats(f), half) for r, f in zip(real_f, fake_f))
    print(f"\nHeld-out AUC, the run's reals ({cfg.nitro.real}) vs its 1-step student ({a.work}), t* {a.t_star}, "
          f"whole image with the prompt, {half} + {half} rows to train on, {n - half} + {n - half} held out, "
          f"{a.updates} updates; median / best of {len(real_f)} encoder levels\n")
    print("| head | " + " | ".join(s[0] for s in SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for kind in ("patch", "stats"):
        cells = []
        for _, lr, betas, b in SETTINGS:
            aucs = sorted(online(kind, lr, betas, b, lvl) for lvl in range(len(real_f)))
            cells.append(f"{aucs[len(aucs) // 2]:.2f} / {aucs[-1]:.2f}")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    print(f"\nconverged logistic regression on the stats (LBFGS, head_probe --linear): "
          f"{converged[len(converged) // 2]:.2f} / {converged[-1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
