"""A model's tiny decoder (`vae_preview/`) against its full decoder on the CPU: how close its images are and how
much faster it is, both in torch (the paths TorchBackend.preview() and decode() run).

Quality, against the full decoder's uint8 images of the same latents (mean / max |difference| in levels, PSNR):
  heldout      encoder latents of held-out-split shapes images (combinations the model never trained on)
  student-1    the bundled student's own predicted x0 after 1 step for the eval prompts (what a 1-step request
               with `decoder: fast` decodes), plus the detector's prompt alignment of both decoders' images
  student-4@2  predicted x0 after the second of 4 steps (a mid-way progressive preview; after the first step it
               is the 1-step x0 itself: same timestep, same seed)
Speed: median and minimum of interleaved repeats, batch 1 and 8, decoder + uint8 postprocess.

    python bench/preview_decoder.py                                 # models/default, prints the section
    python bench/preview_decoder.py --write BENCHMARKS.md           # and appends it there
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def compare(full_u8, tiny_u8) -> dict:
    import numpy as np

    d = np.abs(full_u8.astype(np.int16) - tiny_u8.astype(np.int16))
    mse = float((d.astype(np.float64) ** 2).mean())
    return {"mean_abs": round(float(d.mean()), 2), "max_abs": int(d.max()),
            "psnr_db": round(10 * math.log10(255**2 / max(mse, 1e-12)), 2)}


def student_latents(pipe, prompts: list[str], steps: int, seeds: list[int], upto: int = 1):
    """Predicted x0 after step `upto` of `steps`-step generations (UNet-space latents)."""
    import torch

    from nitrofusion.generation import GenerationRequest, new_row, step_rows

    side = pipe.model.native_size
    rows = [new_row(GenerationRequest(p, steps, s, side, side), pipe.sampler, pipe.backend, pipe.shift)
            for p, s in zip(prompts, seeds)]
    for _ in range(upto):
        step_rows(pipe.backend, pipe.sampler, rows)
    return torch.cat([r.x0 for r in rows])


def measure(model_dir: Path, n: int, repeats: int) -> tuple[list[dict], list[dict], dict]:
    import torch

    from nitrofusion.pipeline import load_pipeline
    from trainer.config import TrainConfig
    from trainer.evaluate import SEED0, alignment, eval_set
    from trainer.shapes import ShapesDataset
    from trainer.stage1 import encode_images

    pipe = load_pipeline(model_dir, device="cpu", backend="torch")
    be, vae = pipe.backend, pipe.model.vae
    if pipe.model.preview_vae is None:
        raise SystemExit(f"{model_dir} has no vae_preview/")
    cfg = TrainConfig.load(model_dir / "train_config.json")
    held = ShapesDataset(cfg.data.image_size, cfg.data.seed, "heldout", cfg.data.heldout_fraction)
    images, _ = held.batch(range(10**6, 10**6 + n))  # not the indices the distillation evaluated on
    prompts, attrs, _ = eval_set(cfg, "train", n)
    seeds = [SEED0 + i for i in range(n)]
    quality = []
    with torch.inference_mode():
        sets = {"heldout": encode_images(vae, torch.from_numpy(images)),
                "student-1": student_latents(pipe, prompts, 1, seeds),
                "student-4@2": student_latents(pipe, prompts, 4, seeds, upto=2)}
    for name, z in sets.items():
        full, tiny = be.decode(z), be.preview(z)
        row = {"latents": name, "n": n, **compare(full, tiny)}
        if name == "student-1":
            row["alignment_full"], _ = alignment(full, attrs)
            row["alignment_fast"], _ = alignment(tiny, attrs)
        quality.append(row)
    speed = []
    for batch in (1, 8):
        z = sets["student-1"][:batch]
        times = {"full": [], "fast": []}
        fns = {"full": be.decode, "fast": be.preview}
        for fn in fns.values():
            fn(z)
        for _ in range(repeats):
            for name, fn in fns.items():  # interleaved: drift on this shared machine hits both alike
                t0 = time.perf_counter()
                fn(z)
                times[name].append(1000 * (time.perf_counter() - t0))
        speed.append({"batch": batch, **{f"{k}_median_ms": statistics.median(v) for k, v in times.items()},
                      **{f"{k}_min_ms": min(v) for k, v in times.items()}})
    return quality, speed, {"threads": torch.get_num_threads(), "torch": torch.__version__}


def flops(model_dir: Path) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from nitrofusion.models import load_model

    m = load_model(model_dir)
    z = torch.zeros(1, int(m.vae.config.latent_channels), m.native_size // 8, m.native_size // 8)
    out = {}
    for name, fn in {"full": lambda: m.vae.decode(z), "fast": lambda: m.preview_vae.decode(z)}.items():
        with FlopCounterMode(display=False) as fc, torch.inference_mode():
            fn()
        out[name] = fc.get_total_flops() / 1e6
    out["params_full"] = sum(p.numel() for p in m.vae.decoder.parameters()) + sum(
        p.numel() for p in m.vae.post_quant_conv.parameters())
    out["params_fast"] = sum(p.numel() for p in m.preview_vae.decoder.parameters())
    return out


def markdown(model_dir: Path, quality, speed, info, fl, command: str) -> str:
    import os

    lines = [f"## Tiny decoder vs full decoder on the CPU: {model_dir.name}", "",
             (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; `{command}`; machine: {os.cpu_count()} cores "
             f"({platform.machine()}), load average {os.getloadavg()[0]:.1f} at the end (shared machine); torch "
             f"{info['torch']} ({info['threads']} thread(s)). Decoder + uint8 postprocess, the torch backend's "
             f"decode() and preview(). Work per 1-image decode: full {fl['full']:.0f} MFLOP "
             f"({fl['params_full'] / 1e3:.0f}k parameters), fast {fl['fast']:.0f} MFLOP "
             f"({fl['params_fast'] / 1e3:.0f}k)."), "",
             "| latents | images | mean abs diff (levels) | max abs diff | PSNR dB | prompt alignment full / fast |",
             "|---|---|---|---|---|---|"]
    for q in quality:
        al = f"{q['alignment_full']:.1%} / {q['alignment_fast']:.1%}" if "alignment_full" in q else "-"
        lines.append(f"| {q['latents']} | {q['n']} | {q['mean_abs']} | {q['max_abs']} | {q['psnr_db']} | {al} |")
    lines += ["", "| batch | full median (min), ms | fast median (min), ms | speed-up, medians (minima) |",
              "|---|---|---|---|"]
    for s in speed:
        lines.append(f"| {s['batch']} | {s['full_median_ms']:.1f} ({s['full_min_ms']:.1f}) | "
                     f"{s['fast_median_ms']:.1f} ({s['fast_min_ms']:.1f}) | "
                     f"x{s['full_median_ms'] / s['fast_median_ms']:.2f} (x{s['full_min_ms'] / s['fast_min_ms']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(REPO / "models" / "default"))
    p.add_argument("--images", type=int, default=128, help="latents per quality row")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--write", default=None, help="append the section to this file (e.g. BENCHMARKS.md)")
    args = p.parse_args(argv)
    from nitrofusion.models import quiet_libraries

    quiet_libraries()
    model_dir = Path(args.model)
    quality, speed, info = measure(model_dir, args.images, args.repeats)
    command = "python bench/preview_decoder.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(model_dir, quality, speed, info, flops(model_dir), command.strip())
    print(text)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
