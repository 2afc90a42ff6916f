"""How well a `shapes` autoencoder reconstructs dataset images, read back by the eval's detector: the ceiling
for every latent model trained on it (README, 'What limits it'). Prints the alignment of the reconstructions
(background, colour, shape and position all right), each attribute, and the pass rate by size x fill.

    python bench/autoencoder_recon.py                                   # models/default/vae, 400 images
    python bench/autoencoder_recon.py outputs/shapes/autoencoder/vae --images 1000
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def reconstruct(vae_dir: Path, n: int, size: int, batch: int = 50) -> tuple[Counter, Counter, Counter]:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    from trainer.detector import detect
    from trainer.shapes import ShapesDataset

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    data = ShapesDataset(size=size, seed=7, split="train")  # seed 7: not the training stream's seed 0
    hits, groups, passed = Counter(), Counter(), Counter()
    with torch.no_grad():
        for start in range(0, n, batch):
            idx = range(start, min(n, start + batch))
            x, _ = data.batch(idx)
            y = vae.decode(vae.encode(torch.from_numpy(x)).latent_dist.mode()).sample.clamp(-1, 1)
            images = ((y.numpy().transpose(0, 2, 3, 1) + 1) * 127.5).round().astype(np.uint8)
            for i, image in zip(idx, images):
                a = data.attributes(i)[0]
                m = detect(image).matches(a)
                hits.update(k for k, ok in m.items() if ok)
                groups[(a.size, a.fill)] += 1
                passed[(a.size, a.fill)] += m["all"]
    return hits, groups, passed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("vae", nargs="?", default=str(REPO / "models" / "default" / "vae"), help="AutoencoderKL folder")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--size", type=int, default=64, help="image side the autoencoder was trained at")
    args = p.parse_args()
    if not (Path(args.vae) / "config.json").is_file():
        p.error(f"{args.vae} is not an AutoencoderKL folder (no config.json)")
    hits, groups, passed = reconstruct(Path(args.vae), args.images, args.size)
    n = args.images
    print(f"reconstructions of {n} training-split images through the detector ({args.vae})")
    print(f"  alignment {hits['all'] / n:.1%}  " + "  ".join(
        f"{k} {hits[k] / n:.1%}" for k in ("background", "colour", "shape", "position", "size", "fill")))
    for key in sorted(groups):
        print(f"  {key[0]:5s} {key[1]:9s} {passed[key]:4d} / {groups[key]:4d}  {passed[key] / groups[key]:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
