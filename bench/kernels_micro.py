"""GPU micro-benchmark of kernels/ against the torch ops they replace, at SDXL 1024^2 shapes (CUDA only).

Each line: the shape, torch eager time, fused time (triton.testing.do_bench medians, ms), speed-up, and the
largest difference from the torch reference (fp32 reference for GroupNorm; bit-exact expected elsewhere).

    python bench/kernels_micro.py [--out FILE.md]
"""

# The timed closures are called inside the loop iteration that defines them (do_bench runs them at once).
# ruff: noqa: B023
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

# (what, shape, groups): UNet resnets at 1024^2 (128^2 latents) and the VAE decoder's largest activations.
GN_SHAPES = [
    ("unet", (1, 320, 128, 128), 32), ("unet", (1, 640, 64, 64), 32), ("unet", (1, 1280, 32, 32), 32),
    ("unet b8", (8, 320, 128, 128), 32),
    ("vae", (1, 512, 128, 128), 32), ("vae", (1, 512, 256, 256), 32), ("vae", (1, 256, 512, 512), 32),
    ("vae", (1, 256, 1024, 1024), 32), ("vae", (1, 128, 1024, 1024), 32),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels_micro: no CUDA device; the CPU checks are tests/test_kernels_*.py", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from kernels.groupnorm import group_norm_act, group_norm_act_ref
    from kernels.postprocess import to_uint8, to_uint8_ref
    from kernels.sampler_step import lcm_step, lcm_step_ref, step_coefficients
    from nitrofusion.sampler import LCMSampler
    from nitrofusion.tiny import tiny_scheduler

    rows = [f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}", "",
            "| kernel | shape | dtype | layout | torch ms | fused ms | speed-up | max diff |",
            "|---|---|---|---|---|---|---|---|"]

    def add(kernel, shape, dtype, layout, t_ref, t_new, diff):
        rows.append(f"| {kernel} | {tuple(shape)} | {str(dtype).replace('torch.', '')} | {layout} | {t_ref:.3f} | "
                    f"{t_new:.3f} | {t_ref / t_new:.2f}x | {diff:.3g} |")
        print(rows[-1], flush=True)

    dev = "cuda"
    # 1. GroupNorm + SiLU (the resnet pair), with the time-embedding add on UNet shapes.
    for what, shape, groups in GN_SHAPES:
        for dtype in (torch.float16, torch.bfloat16) if what == "vae" else (torch.float16,):
            for layout in ("nchw", "channels_last"):
                x = torch.randn(shape, device=dev, dtype=dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                w = torch.randn(shape[1], device=dev, dtype=dtype)
                b = torch.randn(shape[1], device=dev, dtype=dtype)
                temb = torch.randn(shape[:2], device=dev, dtype=dtype) if what.startswith("unet") else None
                if temb is None:
                    def eager():
                        return F.silu(F.group_norm(x, groups, w, b, 1e-6))
                else:
                    def eager():
                        return F.silu(F.group_norm(x + temb[:, :, None, None], groups, w, b, 1e-5))
                fused = lambda: group_norm_act(x, w, b, groups, 1e-5, "silu", temb)  # noqa: E731
                diff = (fused().float() - group_norm_act_ref(x, w, b, groups, 1e-5, "silu", temb).float()).abs().max()
                name = "gn+silu" + ("+temb" if temb is not None else "")
                add(name, shape, dtype, layout, do_bench(eager), do_bench(fused), float(diff))
                del x
    # 2. Postprocess: decoder output -> uint8 HWC on the device (the host copy is the same for both).
    for shape in [(1, 3, 1024, 1024), (8, 3, 1024, 1024), (1, 3, 512, 512)]:
        im = torch.randn(shape, device=dev, dtype=torch.bfloat16)
        diff = (to_uint8(im).int() - to_uint8_ref(im).int()).abs().max()
        add("to_uint8", shape, im.dtype, "nchw", do_bench(lambda: to_uint8_ref(im)), do_bench(lambda: to_uint8(im)),
            float(diff))
    # 3. GEGLU of the UNet's feed-forward at 1024^2: 4096 tokens x 640 ch and 1024 tokens x 1280 ch (inner 4x).
    from kernels.geglu import geglu, geglu_ref

    for shape in [(1, 4096, 2 * 2560), (1, 1024, 2 * 5120), (8, 4096, 2 * 2560)]:
        p = torch.randn(shape, device=dev, dtype=torch.float16)

        def eager():
            h, g = p.chunk(2, dim=-1)
            return h * F.gelu(g)

        diff = (geglu(p).float() - geglu_ref(p).float()).abs().max()
        add("geglu", shape, p.dtype, "-", do_bench(eager), do_bench(lambda: geglu(p)), float(diff))
    # 4. Sampler step, all rows at once (fp32 latents), mixed finished / re-noised rows.
    sampler = LCMSampler.from_scheduler_config(dict(tiny_scheduler().config))
    for b in (1, 8):
        x, eps, z = (torch.randn(b, 4, 128, 128, device=dev) for _ in range(3))
        ts, lv = [249, 187, 124, 62] * 2, [749, 499, 249, -1] * 2
        ts, lv = ts[:b], lv[:b]
        coef = step_coefficients(sampler, ts, lv, dev)
        d1, n1 = lcm_step(sampler, x, eps, ts, lv, z, coefficients=coef)
        d0, n0 = lcm_step_ref(sampler, x, eps, ts, lv, z)
        diff = max((d1 - d0).abs().max().item(), (n1 - n0).abs().max().item())
        add("lcm_step", (b, 4, 128, 128), torch.float32, "nchw",
            do_bench(lambda: lcm_step_ref(sampler, x, eps, ts, lv, z)),
            do_bench(lambda: lcm_step(sampler, x, eps, ts, lv, z, coefficients=coef)), diff)
    text = "\n".join(rows) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
