"""Closed-loop load against real server processes: the step-level batching engine vs one request at a time.

Each concurrency level runs C clients that each send a request as soon as their previous one returns, with
step counts drawn uniformly from 1-4 (fixed RNG seed), until N requests are done. Both modes run in the same
invocation on the same machine, so compare their ratio, not absolute numbers across runs.

    python bench/server_load.py --model models/default          # the bundled model
    python bench/server_load.py --tiny                          # a tiny random SD model (smoke run)
    python bench/server_load.py --random-sdxl full --format jpeg   # SDXL architecture, random fp16 weights (GPU)
    python bench/server_load.py --random-sdxl tiny              # the same code path at toy sizes (CPU smoke run)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The installed console script, else the module (the GPU machine runs from a source tree, nothing installed).
_SCRIPT = Path(sys.executable).parent / "nitrofusion"
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "cli.main"]


def save_standin_model(path: Path) -> Path:
    """Random weights in the bundled model's architecture (the shapes recipe): the same compute per request
    as models/default, for measuring before the trained model exists."""
    from diffusers import StableDiffusionPipeline

    from trainer.config import BUNDLED_RECIPE, recipe
    from trainer.export import student_scheduler
    from trainer.models import build_text_encoder, build_tokenizer, build_unet, build_vae

    cfg = recipe(BUNDLED_RECIPE)
    tok = build_tokenizer(cfg.text.max_length)
    vae = build_vae(cfg.autoencoder, cfg.data.image_size)
    factor = 2 ** (len(cfg.autoencoder.block_out_channels) - 1)
    unet = build_unet(cfg.teacher.unet, cfg.data.image_size // factor, cfg.text.hidden_size,
                      cfg.autoencoder.latent_channels)
    StableDiffusionPipeline(
        vae=vae, text_encoder=build_text_encoder(cfg.text, tok), tokenizer=tok, unet=unet,
        scheduler=student_scheduler(cfg.nitro.shift), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    return path


def save_random_sdxl(path: Path, size: str) -> Path:
    """SDXL's architecture (bench/gpu_pipeline.py's public configs) with random weights, saved in fp16 with the
    student scheduler: what a server with NitroSD-Realism computes per request, with no download. `tiny`
    builds nitrofusion.tiny's SDXL instead, to smoke-test this path on a CPU."""
    import gc

    import torch
    from diffusers import StableDiffusionXLPipeline

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_pipeline import build_components

    from trainer.export import student_scheduler

    cuda = size == "full" and torch.cuda.is_available()
    unet, vae, (te1, te2), (tok1, tok2), _ = build_components(size == "tiny", "cuda" if cuda else "cpu", seed=0)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=student_scheduler(250))
    if size == "full":
        pipe.to(torch.float16)
    pipe.save_pretrained(path)
    del pipe, unet, vae, te1, te2
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # the servers get the whole card
    return path


def machine_line() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"GPU {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MODES = {  # name -> (batching, extra environment of the server process)
    "step-level engine": (True, {}),
    "one at a time": (False, {}),
    # the engine with decodes on the main stream, after each step (CUDA: what overlapping saves)
    "engine without overlap": (True, {"NITROFUSION_OVERLAP": "0"}),
}


def start_server(model: str, batching: bool, max_batch: int, backend: str | None, buckets: str | None = None,
                 env: dict | None = None, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    args = [*CLI, "serve", "--model", model, "--port", str(port), "--max-queue", "4096", "--log-level", "warning",
            "--max-batch", str(max_batch), "--request-timeout", "3600"]
    if buckets:
        args += ["--buckets", buckets]
    args += extra or []
    if not batching:
        args.append("--no-batching")
    if backend:
        args += ["--backend", backend]
    # stderr to a file, not a pipe: nobody reads a pipe during the run, and a full one would stall the server
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server process
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited: {log.read()[-4000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not become ready")


async def closed_loop(url: str, concurrency: int, total: int, size: int, seed: int, fmt: str = "png",
                      steps: int | str | None = None) -> dict:
    """`steps` None: uniform in 1-4 per request (fixed RNG seed); else every request asks for it (1-4 or "auto",
    then the chosen counts are read back from the JSON answers)."""
    rng = random.Random(seed)
    plan = [rng.randint(1, 4) if steps is None else steps for _ in range(total)]
    latencies: list[float] = []
    chosen: list[int] = []
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            body = {"prompt": f"benchmark prompt {i % 7}", "steps": plan[i], "seed": i, "width": size,
                    "height": size, "output_format": fmt}
            t0 = time.perf_counter()
            r = await http.post(url + "/generate", json=body, headers={"Accept": f"image/{fmt}"})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            chosen.append(int(r.headers.get("x-steps", 0)))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "images_per_s": total / wall,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "mean_steps": statistics.fmean(chosen) if chosen else None,
    }


def auto_comparison(model: str, args, levels: list[int]) -> str:
    """One engine server with --latency-target-ms; at each concurrency, closed loops of "auto", fixed-4 and
    fixed-1 requests: p50 / p99 latency and the mean steps the server chose."""
    rows, repeats = [], {}
    proc, url = start_server(model, True, args.max_batch, args.backend, args.buckets,
                             extra=["--latency-target-ms", str(args.auto)])
    try:
        for run in range(args.repeat):
            for c in levels:
                n = args.requests or max(32, args.per_client * c)
                for steps in ("auto", 4, 1):
                    r = asyncio.run(closed_loop(url, c, n, args.size, seed=c, fmt=args.format, steps=steps))
                    if run == 0:
                        rows.append((c, steps, r))
                    repeats.setdefault(c, []).append((steps, r))
                    print(f"auto-compare run {run + 1} c={c:3d} steps={steps!s:4s} {r['images_per_s']:7.2f} img/s  "
                          f"p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  mean steps {r['mean_steps']:.2f}",
                          flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    lines = [(f"### Steps chosen by load: latency target {args.auto:g} ms ({Path(model).name}, {args.size}x{args.size}, "
             f"{args.backend or 'torch'} backend)"), "",
             f"- Machine: {machine_line()}; date {datetime.now(UTC):%Y-%m-%d}",
             f"- Command: `python bench/server_load.py {' '.join(sys.argv[1:])}`",
             (f"- One engine server with `--latency-target-ms {args.auto:g}`, max batch {args.max_batch}; closed "
             "loops where every request asks for the same steps"), "",
             "| concurrency | steps asked | img/s | p50 ms | p99 ms | p99 / target | mean steps |",
             "|---|---|---|---|---|---|---|"]
    for c, steps, r in rows:
        lines.append(f"| {c} | {steps} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{r['p99_ms'] / args.auto:.2f} | {r['mean_steps']:.2f} |")
    if args.repeat > 1:
        # p99 over a few hundred requests is the third-worst of them: one sweep says little, the spread says more.
        lines += ["", (f"The same sweep {args.repeat} times on the same server (the table above is the first): p99 "
                       "/ target for each run, then the median over runs."), "",
                  "| concurrency | steps asked | p99 / target, each run | median | mean steps, each run |",
                  "|---|---|---|---|---|"]
        for c, results in repeats.items():
            for steps in ("auto", 4, 1):
                ratios = [r["p99_ms"] / args.auto for s, r in results if s == steps]
                means = [r["mean_steps"] for s, r in results if s == steps]
                lines.append(f"| {c} | {steps} | {', '.join(f'{x:.2f}' for x in ratios)} | "
                             f"{statistics.median(ratios):.2f} | {', '.join(f'{x:.2f}' for x in means)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers model folder (default: models/default)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random SD1.x model (smoke run)")
    ap.add_argument("--standin", action="store_true",
                    help="random weights in the bundled model's architecture (before models/default exists)")
    ap.add_argument("--random-sdxl", choices=["full", "tiny"], default=None,
                    help="SDXL architecture with random weights (full: real size, fp16; tiny: smoke run)")
    ap.add_argument("--format", default="png", choices=["png", "jpeg", "webp"], help="response image format")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's native size)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default max(32, P x C))")
    ap.add_argument("--per-client", type=int, default=4, help="P above: requests per client at each level")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--backend", default="torch", help="torch (default) or onnxruntime")
    ap.add_argument("--buckets", default=None, help="the server's --buckets (default: its own)")
    ap.add_argument("--warmup-sizes", default=None, help="the server's --warmup-sizes (default: its native size)")
    ap.add_argument("--warmup-requests", type=int, default=0,
                    help="untimed requests per server before measuring (the server warms up its native size only)")
    ap.add_argument("--auto", type=float, default=None, metavar="TARGET_MS",
                    help='instead of the modes: "steps": "auto" against fixed 4 and fixed 1 steps on one server with '
                         "this latency target")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="with --auto: run the whole sweep N times on one server and add each run's p99 to the table")
    ap.add_argument("--modes", default="step-level engine,one at a time",
                    help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--write", default=None, help="append the results to this markdown file (BENCHMARKS.md)")
    args = ap.parse_args()

    tmp = None
    if args.tiny:
        from nitrofusion.tiny import save_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model = str(save_tiny_model(Path(tmp.name) / "tiny_sd", "sd"))
    elif args.random_sdxl:
        tmp = tempfile.TemporaryDirectory()
        model = str(save_random_sdxl(Path(tmp.name) / f"random_sdxl_{args.random_sdxl}", args.random_sdxl))
    elif args.standin:
        tmp = tempfile.TemporaryDirectory()
        model = str(save_standin_model(Path(tmp.name) / "standin_shapes"))
    else:
        model = args.model or str(ROOT / "models" / "default")
    if args.size is None:
        from nitrofusion.models import load_model

        args.size = load_model(model).native_size
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.auto is not None:
        table = auto_comparison(model, args, levels)
        print("\n" + table)
        if args.write:
            with open(args.write, "a") as f:
                f.write("\n" + table)
        if tmp is not None:
            tmp.cleanup()
        return
    results: dict[str, dict[int, dict]] = {}
    modes = [m.strip() for m in args.modes.split(",")]
    if unknown := [m for m in modes if m not in MODES]:
        raise SystemExit(f"unknown mode(s) {unknown}: use {', '.join(MODES)}")
    for mode in modes:
        batching, env = MODES[mode]
        warm = ["--warmup-sizes", args.warmup_sizes] if args.warmup_sizes else []
        proc, url = start_server(model, batching, args.max_batch, args.backend, args.buckets, env, warm)
        try:
            if args.warmup_requests:  # untimed: first-use costs at this size (graph captures off the native size)
                asyncio.run(closed_loop(url, max(levels), args.warmup_requests, args.size, seed=0, fmt=args.format))
            results[mode] = {}
            for c in levels:
                n = args.requests or max(32, args.per_client * c)
                results[mode][c] = r = asyncio.run(closed_loop(url, c, n, args.size, seed=c, fmt=args.format))
                print(f"{mode:18s} c={c:3d}  {r['images_per_s']:7.2f} img/s  p50 {r['p50_ms']:8.1f} ms  "
                      f"p99 {r['p99_ms']:8.1f} ms", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)

    lines = [
        (f"### Server load: step-level engine vs one at a time ({Path(model).name}, {args.size}x{args.size}, "
        f"{args.backend or 'torch'} backend)"),
        "",
        f"- Machine: {machine_line()}; date {datetime.now(UTC):%Y-%m-%d}",
        f"- Command: `python bench/server_load.py {' '.join(sys.argv[1:])}`",
        f"- Closed loop, steps uniform in 1-4, max batch {args.max_batch}, {args.format.upper()} responses",
        "",
        ("| concurrency | engine img/s | one-at-a-time img/s | speed-up | engine p50 / p99 ms | "
        "one-at-a-time p50 / p99 ms |"),
        "|---|---|---|---|---|---|",
    ]
    for c in levels:
        e, o = results.get("step-level engine", {}).get(c), results.get("one at a time", {}).get(c)
        if e and o:
            lines.append(f"| {c} | {e['images_per_s']:.2f} | {o['images_per_s']:.2f} | "
                         f"{e['images_per_s'] / o['images_per_s']:.2f}x | {e['p50_ms']:.0f} / {e['p99_ms']:.0f} | "
                         f"{o['p50_ms']:.0f} / {o['p99_ms']:.0f} |")
    if "engine without overlap" in results:
        lines += ["", "| concurrency | engine without overlap img/s | p50 / p99 ms | overlap gain |", "|---|---|---|---|"]
        for c in levels:
            n, e = results["engine without overlap"][c], results.get("step-level engine", {}).get(c)
            gain = f"{e['images_per_s'] / n['images_per_s']:.2f}x" if e else "-"
            lines.append(f"| {c} | {n['images_per_s']:.2f} | {n['p50_ms']:.0f} / {n['p99_ms']:.0f} | {gain} |")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    if args.write:
        with open(args.write, "a") as f:
            f.write("\n" + table)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
