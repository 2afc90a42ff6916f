"""Does a one-step init memorise its cache? Its regression loss on cached pairs against fresh teacher pairs.

The init (trainer/stage2.py) regresses the student's one-step output on the teacher's sample from the same noise,
drawing batches from a fixed cache. The teacher's sampler is deterministic given the noise and prompt, so a student
that learned the mapping would score about the same on pairs it never saw; a much lower loss on the cache's own
pairs says it learned those pairs instead. The fresh pairs use prompts from dataset indices no cache reaches and
their own noise, drawn once by the work folder's teacher and kept in `--fresh` (reused on later calls).

    python bench/init_gap.py --work W --unet W/init/unet V/init/unet --pairs 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRESH_OFFSET = 5 * 10**6  # past the cache's prompt indices (CACHE_PROMPT_OFFSET + i, i < num_pairs)
FRESH_SEED = 12345


def fresh_pairs(cfg, work: Path, frozen: dict, n: int, batch: int = 64) -> dict:
    """n teacher samples for prompts and noise no cache holds, drawn as the cache stage draws its pairs."""
    from diffusers import UNet2DConditionModel

    from trainer.conditioning import expand
    from trainer.shapes import ShapesDataset
    from trainer.source import ShapesSource
    from trainer.stage1 import TeacherSampler
    from trainer.stage2 import CACHE_PROMPT_OFFSET

    src = ShapesSource(cfg, work)
    teacher = UNet2DConditionModel.from_pretrained(src.teacher_dir).eval()
    sampler = TeacherSampler.from_config(cfg.teacher, src.noise_schedule)
    d = cfg.data
    prompts = ShapesDataset(d.image_size, d.seed, "train", d.heldout_fraction).prompts(
        [CACHE_PROMPT_OFFSET + FRESH_OFFSET + i for i in range(n)])
    gen = torch.Generator().manual_seed(FRESH_SEED)
    noise = torch.randn((n, src.latent_channels, src.latent_size, src.latent_size), generator=gen)
    x0 = []
    for s in range(0, n, batch):
        p = prompts[s:s + batch]
        x0.append(sampler(teacher, frozen["text"](p), expand(frozen["text"]([""]), len(p)), noise[s:s + batch],
                          generator=gen))
    return {"noise": noise, "x0": torch.cat(x0).float(), "prompts": prompts}


@torch.no_grad()
def one_step_mse(unet, cfg, frozen: dict, pairs: dict, batch: int = 64) -> float:
    from nitrofusion.sampler import LCMSampler
    from trainer.models import NOISE_SCHEDULE, alphas_cumprod
    from trainer.stage2 import one_step_x0

    sampler = LCMSampler(alphas_cumprod(dict(NOISE_SCHEDULE)))
    total = 0.0
    for s in range(0, len(pairs["prompts"]), batch):
        pred = one_step_x0(unet, sampler, pairs["noise"][s:s + batch], frozen["text"](pairs["prompts"][s:s + batch]),
                           cfg.nitro.shift)
        total += F.mse_loss(pred.float(), pairs["x0"][s:s + batch], reduction="sum").item()
    return total / pairs["x0"].numel()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, type=Path, help="a shapes run's folder (teacher, autoencoder, text, cache)")
    p.add_argument("--unet", nargs="+", required=True, type=Path, help="one-step UNet folders to score")
    p.add_argument("--cache", type=Path, help="the cache the UNets were trained on (default: WORK/cache)")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--fresh", type=Path, help="where the fresh pairs are kept (default: WORK/init_gap_fresh.pt)")
    a = p.parse_args(argv)

    from diffusers import UNet2DConditionModel

    from nitrofusion.models import quiet_libraries
    from trainer.cache import PairCache
    from trainer.config import TrainConfig
    from trainer.recipe import frozen_dirs
    from trainer.stage1 import load_frozen

    quiet_libraries()
    cfg = TrainConfig.load(a.work / "teacher" / "train_config.json")
    frozen = load_frozen(frozen_dirs(a.work), "cpu")
    fresh_file = a.fresh or a.work / "init_gap_fresh.pt"
    fresh = torch.load(fresh_file) if fresh_file.is_file() else None
    if fresh is None or len(fresh["prompts"]) < a.pairs:
        fresh = fresh_pairs(cfg, a.work, frozen, a.pairs)
        torch.save(fresh, fresh_file)
    fresh = {k: v[:a.pairs] for k, v in fresh.items()}
    rows = PairCache(a.cache or a.work / "cache").rows(list(range(a.pairs)))
    cached = {"noise": rows.noise, "x0": rows.x0, "prompts": rows.prompts}
    print(f"| unet | MSE on {a.pairs} cached pairs | on {a.pairs} fresh pairs | fresh / cached |\n|---|---|---|---|")
    for path in a.unet:
        unet = UNet2DConditionModel.from_pretrained(path).eval()
        c, f = one_step_mse(unet, cfg, frozen, cached), one_step_mse(unet, cfg, frozen, fresh)
        print(f"| {path} | {c:.5f} | {f:.5f} | {f / c:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
