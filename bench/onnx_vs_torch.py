"""ONNX Runtime vs torch on the CPU: end-to-end generation (UNet steps + VAE decode) at batch 1 and 8, 1 and 4
steps, median of repeats. Both backends run in one process, interleaved per configuration, so compare the
ratio within one run, not absolute numbers across runs (this machine is shared and noisy).

    python bench/onnx_vs_torch.py                          # tiny random SDXL model (the default model is pending)
    python bench/onnx_vs_torch.py --model DIR --size 512   # a real diffusers folder (exports it to ONNX first)
    python bench/onnx_vs_torch.py --write BENCHMARKS.md    # replace this benchmark's section there
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

SECTION = "## ONNX Runtime vs torch on the CPU"  # + ": <model>", one section per model


def bench(model_dir: Path, family_note: str, size: int | None, repeats: int, threads: int | None, work: Path
          ) -> tuple[list[dict], dict]:
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_onnx
    from nitrofusion.generation import GenerationRequest
    from nitrofusion.pipeline import load_pipeline

    onnx_dir = work / "onnx"
    export_onnx(model_dir, onnx_dir, precisions=("fp32",), progress=False)
    from nitrofusion.artifacts.exported import load_exported_model
    from nitrofusion.backends.onnxruntime_backend import OnnxRuntimeBackend
    from nitrofusion.pipeline import Pipeline

    if threads is not None:
        torch.set_num_threads(threads)
    ort_model, _ = load_exported_model(onnx_dir)
    ort_backend = OnnxRuntimeBackend(ort_model, onnx_dir, device="cpu", threads=threads)
    torch_pipe = load_pipeline(model_dir, device="cpu", backend="torch")
    pipes = {"torch": torch_pipe, "onnxruntime": Pipeline(ort_model, ort_backend, torch_pipe.sampler)}
    side = size or pipes["torch"].model.native_size
    rows = []
    for batch in (1, 8):
        for steps in (1, 4):
            reqs = [GenerationRequest(f"a photo of a cat {i % 3}", steps, 1000 + i, side, side) for i in range(batch)]
            times: dict[str, list[float]] = {name: [] for name in pipes}
            for name, pipe in pipes.items():
                pipe(reqs)  # warm-up: sessions, allocator, prompt cache
            for _ in range(repeats):
                for name, pipe in pipes.items():  # interleaved, so drift hits both alike
                    t0 = time.perf_counter()
                    pipe(reqs)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            best = {name: min(ts) for name, ts in times.items()}  # least disturbed by other load on the machine
            rows.append({"batch": batch, "steps": steps, "torch_s": med["torch"], "ort_s": med["onnxruntime"],
                         "torch_min_s": best["torch"], "ort_min_s": best["onnxruntime"],
                         "speedup": med["torch"] / med["onnxruntime"],
                         "speedup_min": best["torch"] / best["onnxruntime"]})
            print(f"batch {batch} steps {steps}: torch {med['torch'] * 1000:.1f} ms, onnxruntime "
                  f"{med['onnxruntime'] * 1000:.1f} ms, ORT speedup x{rows[-1]['speedup']:.2f} (of minima "
                  f"x{rows[-1]['speedup_min']:.2f})", flush=True)
    info = {"model": family_note, "size": side, "repeats": repeats, "torch": torch.__version__,
            "onnxruntime": ort.__version__, "torch_threads": torch.get_num_threads(),
            "ort_threads": threads or "default: one per core",
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "load": os.getloadavg()[0]}
    return rows, info


def medium_model(root: Path) -> Path:
    """A random SD1.x-family model with real-sized blocks (SD1.5's UNet layout at 1/5 the width, an 8x VAE), so
    convolutions and attention dominate as they do in real models, unlike the tiny test model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nitrofusion.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd", seed=0)
    pipe.unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256, 256), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32, attention_head_dim=8,
    )
    pipe.vae = AutoencoderKL(block_out_channels=[32, 64, 128, 128], latent_channels=4, norm_num_groups=32,
                             down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                             layers_per_block=2, sample_size=256)
    pipe.register_modules(unet=pipe.unet, vae=pipe.vae)
    pipe.save_pretrained(root)
    return root


def markdown(rows: list[dict], info: dict, command: str, heading: str) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        heading, "",
        (f"{date}; `{command}`; {info['model']} at {info['size']}x{info['size']}; machine: {info['cores']} "
        f"cores ({info['cpu']}), load average {info['load']:.1f} at the end (shared machine); torch "
        f"{info['torch']} ({info['torch_threads']} thread(s)), onnxruntime {info['onnxruntime']} (CPU EP, threads: "
        f"{info['ort_threads']}). End-to-end "
        f"generation (prompt embeddings cached), median and minimum of {info['repeats']} interleaved repeats; torch "
        f"suffers most from other load on this shared 2-core machine, so the minima are the steadier comparison."),
        "",
        "| batch | steps | torch median (min), ms | onnxruntime median (min), ms | ORT speedup, medians (minima) |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['batch']} | {r['steps']} | {r['torch_s'] * 1000:.1f} ({r['torch_min_s'] * 1000:.1f}) | "
              f"{r['ort_s'] * 1000:.1f} ({r['ort_min_s'] * 1000:.1f}) | x{r['speedup']:.2f} (x{r['speedup_min']:.2f}) |"
              for r in rows]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str, heading: str) -> None:
    """Replace this benchmark's section for this model (up to the next '## ' heading), keeping all others."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    start = old.find(heading + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text
    else:
        end = old.find("\n## ", start + len(heading))
        new = old[:start] + text + ("" if end < 0 else old[end:])
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="diffusers folder (default: a tiny random SDXL model)")
    ap.add_argument("--medium", action="store_true", help="a random model with SD1.5-like block layout (256 px)")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's native)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads for both torch and onnxruntime (default: each library's own)")
    ap.add_argument("--write", default=None, help="markdown file to write this benchmark's section to")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nf-bench-") as work:
        run(args, Path(work))


def run(args: argparse.Namespace, work: Path) -> None:
    if args.model:
        model_dir, note = Path(args.model), f"model `{Path(args.model).name}`"
        heading = f"{SECTION}: {Path(args.model).name}"
    elif args.medium:
        model_dir = medium_model(work / "medium")
        note = "random SD1.x-family model with SD1.5's block layout at 1/5 width (`--medium`)"
        heading = f"{SECTION}: medium random model"
    else:
        from nitrofusion.tiny import save_tiny_model

        model_dir = save_tiny_model(work / "tiny", "sdxl", seed=0)
        note = "tiny random SDXL-family model (nitrofusion.tiny)"
        heading = f"{SECTION}: tiny model"
    if args.threads is not None:
        heading += f", {args.threads} thread{'s' * (args.threads > 1)}"
    rows, info = bench(model_dir, note, args.size, args.repeats, args.threads, work)
    command = "python " + " ".join(["bench/onnx_vs_torch.py", *sys.argv[1:]])
    text = markdown(rows, info, command, heading)
    print(text)
    if args.write:
        write_section(Path(args.write), text, heading)


if __name__ == "__main__":
    main()
