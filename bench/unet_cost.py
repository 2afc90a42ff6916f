"""What a shapes-recipe UNet costs per training step at a given latent side: forward + backward of a batch of
32 with the recipe's text states (77-token-free: text.max_length tokens of width text.hidden_size). Issue 15
asks whether a 16x16-latent UNet with a thin first level costs about what today's 8x8 UNet does.

    python bench/unet_cost.py                      # today's UNet at 8x8 vs the candidates at 16x16
    python bench/unet_cost.py --iters 5 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# (label, latent side, block_out_channels, cross_attn per down block, GroupNorm groups)
CANDIDATES = [
    ("8x8 (32,64,128) FTT g16", 8, (32, 64, 128), (False, True, True), 16),
    ("16x16 (32,64,128) FTT g16", 16, (32, 64, 128), (False, True, True), 16),
    ("16x16 (16,32,64,128) FFTT g8", 16, (16, 32, 64, 128), (False, False, True, True), 8),
    ("16x16 (16,32,64,128) FTTT g8", 16, (16, 32, 64, 128), (False, True, True, True), 8),
    ("16x16 (16,64,128) FTT g8", 16, (16, 64, 128), (False, True, True), 8),
    ("16x16 (32,64,128,128) FFTT g16", 16, (32, 64, 128, 128), (False, False, True, True), 16),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=4)
    a = p.parse_args(argv)
    import torch

    from trainer.config import UNetConfig
    from trainer.models import build_unet, count_params

    torch.manual_seed(0)
    text = torch.randn(a.batch, 32, 64)
    base = None
    print(f"{'UNet':34s} {'params':>8s} {'ms/step':>9s} {'vs today':>9s}")
    for label, side, widths, attn, groups in CANDIDATES:
        unet = build_unet(UNetConfig(block_out_channels=widths, cross_attn=attn, norm_num_groups=groups), side, 64, 4)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        x = torch.randn(a.batch, 4, side, side)
        t = torch.randint(0, 1000, (a.batch,))

        def step(unet=unet, opt=opt, x=x, t=t):
            loss = unet(x, t, encoder_hidden_states=text).sample.square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # warm-up: allocator, oneDNN primitives
        times = []
        for _ in range(a.iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        ms = 1000 * sorted(times)[len(times) // 2]
        base = base or ms
        print(f"{label:34s} {count_params(unet) / 1e6:7.2f}M {ms:9.1f} {ms / base:8.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
