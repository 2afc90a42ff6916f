"""Where the SDXL VAE decoder's time goes on the GPU: torch.profiler over a few decode calls, kernel time grouped
by kind (convolutions, GroupNorm, upsample copies, attention, elementwise, postprocess), for today's default
decoder (fused kernels, eager: a CUDA graph hides its kernels from the profiler) and for the options given.

    python bench/vae_profile.py --size 1024 --batch 1 --spec channels_last,cudnn_benchmark,subpixel
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from vae_decoder import build_models  # noqa: E402

from kernels.postprocess import to_uint8  # noqa: E402
from kernels.vae_fast import DecoderOptions, prepare_decoder  # noqa: E402

KINDS = [  # first match wins; kernel names from cuDNN / CUTLASS / ATen / our Triton kernels
    ("attention", ("flash", "fmha", "attention", "softmax")),
    ("upsample", ("upsample", "interp")),
    ("groupnorm", ("_gn_", "group_norm", "groupnorm")),
    ("postprocess", ("to_uint8",)),
    ("copies / layout", ("nchwtonhwc", "nhwctonchw", "copy", "transpose", "permute", "contiguous")),
    ("conv", ("conv", "xmma", "cutlass", "sm90", "gemm", "implicit", "winograd", "fprop", "dgrad")),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "elementwise/other")


def profile(prep, z, calls: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with torch.inference_mode():
        for _ in range(2):
            to_uint8(prep(z))
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(calls):
                to_uint8(prep(z))
            torch.cuda.synchronize()
    per_kernel: dict[str, float] = defaultdict(float)
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name] += e.time_range.elapsed_us() / 1000 / calls  # ms per call
    by_kind: dict[str, float] = defaultdict(float)
    for name, ms in per_kernel.items():
        by_kind[kind(name)] += ms
    return dict(by_kind), sorted(per_kernel.items(), key=lambda kv: -kv[1])[:12]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--spec", action="append", default=[], help="vae_fast options to profile too (repeatable)")
    ap.add_argument("--calls", type=int, default=3)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("vae_profile: needs a CUDA device", file=sys.stderr)
        return 2
    full, _ = build_models(False, "cuda", torch.bfloat16, 0)
    g = torch.Generator("cpu").manual_seed(0)
    z = (torch.randn(args.batch, 4, args.size // 8, args.size // 8, generator=g) / 0.13025).to("cuda", torch.bfloat16)
    for spec in ["", *args.spec]:
        prep = prepare_decoder(copy.deepcopy(full), DecoderOptions.parse(spec, kernels=True))
        by_kind, top = profile(prep, z, args.calls)
        total = sum(by_kind.values())
        print(f"\n## kernels{'+' + spec if spec else ''}: {args.size}^2 b{args.batch}, {total:.2f} ms of kernels per call")
        for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {k:18s} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
        for name, ms in top:
            print(f"    {ms:7.2f} ms  {name[:110]}")
        prep.undo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
