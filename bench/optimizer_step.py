"""AdamW's fused kernel against torch's per-tensor loop, on the shapes16 recipe's UNet: the optimizer step alone
and a whole training step (forward, backward, clip, step, zero_grad; batch 32, the teacher stage's), the variants
interleaved in rounds so the machine's load that day falls on both alike. Prints a markdown table.

    python bench/optimizer_step.py                 # 4 rounds of 20 training steps per variant
    python bench/optimizer_step.py --rounds 2 --steps 5 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {"per-tensor loop (foreach=False)": {"foreach": False},
            "foreach": {"foreach": True},
            "fused (optim.fused, the default)": {"fused": True}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=20, help="training steps per variant per round")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the recipe's run.threads)")
    a = p.parse_args(argv)
    import torch

    from trainer.config import recipe
    from trainer.models import build_unet, count_params

    torch.set_num_threads(a.threads)
    cfg = recipe("shapes16")
    side = cfg.data.image_size // 4  # the recipe's 4x-down autoencoder
    torch.manual_seed(0)
    base = build_unet(cfg.teacher.unet, side, cfg.text.hidden_size, cfg.autoencoder.latent_channels)
    text = torch.randn(a.batch, cfg.text.max_length, cfg.text.hidden_size)
    x = torch.randn(a.batch, cfg.autoencoder.latent_channels, side, side)
    t = torch.randint(0, 1000, (a.batch,))
    runs = {}
    for name, kw in VARIANTS.items():
        unet = build_unet(cfg.teacher.unet, side, cfg.text.hidden_size, cfg.autoencoder.latent_channels)
        unet.load_state_dict(base.state_dict())
        runs[name] = (unet, torch.optim.AdamW(unet.parameters(), lr=1e-4, **kw))
    n_params, n_tensors = count_params(base), len(list(base.parameters()))

    def train_step(unet, opt) -> float:
        t0 = time.perf_counter()
        loss = unet(x, t, encoder_hidden_states=text).sample.square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def opt_step(unet, opt) -> float:
        for q in unet.parameters():
            q.grad = torch.full_like(q, 1e-3)
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    step_ms = {n: [] for n in runs}
    opt_ms = {n: [] for n in runs}
    for n, (unet, opt) in runs.items():  # warm-up: allocator, oneDNN primitives, optimizer state
        train_step(unet, opt)
    for _ in range(a.rounds):
        for n, (unet, opt) in runs.items():
            step_ms[n] += [1000 * train_step(unet, opt) for _ in range(a.steps)]
            opt_ms[n] += [1000 * opt_step(unet, opt) for _ in range(a.steps)]
            opt.zero_grad(set_to_none=True)
    ref = next(iter(runs))
    print(f"shapes16 UNet: {n_params / 1e6:.2f}M parameters in {n_tensors} tensors; batch {a.batch}, {side}x{side}"
          f" latents; {a.threads} threads; medians of {a.rounds} x {a.steps} steps per variant, interleaved\n")
    print("| AdamW | optimizer step, ms | training step, ms | training step vs the per-tensor loop |")
    print("|---|---|---|---|")
    for n in runs:
        o, s = statistics.median(opt_ms[n]), statistics.median(step_ms[n])
        print(f"| {n} | {o:.1f} | {s:.1f} | {s / statistics.median(step_ms[ref]):.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
