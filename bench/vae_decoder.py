"""VAE decoder speed, option by option (GPU issue 16): one script, one card, one process.

SDXL's VAE decoder (public config, random weights: bench/gpu_pipeline.py SDXL_VAE) in bf16 at 1024^2 and 512^2,
batch 1 and 8, decoder + uint8 postprocess on the device. Each case (CASES) is a fresh copy of the same weights
with kernels/vae_fast.py options: `eager` is today's path without kernels, `kernels+graph` TODAY'S DEFAULT (fused
GroupNorm+SiLU and postprocess, a CUDA graph per shape) and the reference output; the others add channels_last,
cudnn_benchmark, subpixel (upsample+conv as one 2x2 conv), fp16 with the overflow guard, torch.compile modes
inside or instead of our graphs; `tiny...` is AutoencoderTiny (TAESD / TAESDXL layout) on UNet-space latents.

Per case and shape: median ms of timed calls after warm-up (CUDA events), the first call's time (compile, cuDNN
benchmark, graph capture), peak memory, and against the reference on the same fixed-seed input (N(0, 1)
UNet-space latents / scaling factor, as the backend does) the max |difference| in uint8 levels and the share of
pixels that differ; the reference's share of saturated (0/255) values too, as random weights can saturate.
torch.compile starts from an empty inductor cache unless --inductor-cache is given; the first compile case is
compiled again from that cache, to show what a restart costs.

    python bench/vae_decoder.py --budget-s 150 --json OUT/vae.json --markdown OUT/vae.md   # on the GPU
    python bench/vae_decoder.py --tiny                                                 # CPU smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from gpu_pipeline import SDXL_VAE  # noqa: E402  (the public SDXL VAE config)
from vae_report import markdown, versions  # noqa: E402

from kernels.vae_fast import DecoderOptions, prepare_decoder  # noqa: E402

TINY_VAE = {**SDXL_VAE, "block_out_channels": [8, 16, 16, 16], "norm_num_groups": 4, "sample_size": 64}


class Case(NamedTuple):  # not a dataclass: tests load this file without registering it in sys.modules
    name: str
    spec: str = ""  # kernels/vae_fast.py text form
    kernels: bool = False
    graph: bool = False
    tiny: bool = False  # the AutoencoderTiny decoder instead of the full one
    compile_est_s: float = 0.0  # expected first-call cost of one shape (budget planning)


CASES = [  # run in this order: today's default first (the reference), compile cases last (slowest)
    Case("kernels+graph", kernels=True, graph=True),
    Case("eager"),
    Case("kernels", kernels=True),
    Case("channels_last", "channels_last"),
    Case("kernels+cl", "channels_last", kernels=True),
    Case("kernels+cl+cudnn", "channels_last,cudnn_benchmark", kernels=True),
    Case("kernels+cl+cudnn+graph", "channels_last,cudnn_benchmark", kernels=True, graph=True),
    Case("kernels+subpixel+graph", "subpixel", kernels=True, graph=True),
    Case("kernels+cl+cudnn+subpixel+graph", "channels_last,cudnn_benchmark,subpixel", kernels=True, graph=True),
    Case("kernels+cl+cudnn+subpixel+fp16+graph", "channels_last,cudnn_benchmark,subpixel,fp16", kernels=True,
         graph=True),
    Case("tiny", tiny=True),
    Case("tiny+cl+cudnn+graph", "channels_last,cudnn_benchmark", graph=True, tiny=True),
    Case("compile+cl+cudnn+subpixel+graph", "channels_last,cudnn_benchmark,subpixel,compile", graph=True,
         compile_est_s=60),
    Case("compile+graph", "compile", graph=True, compile_est_s=60),
    Case("compile-mat+cl+graph", "channels_last,compile=max-autotune-no-cudagraphs", graph=True, compile_est_s=150),
    Case("compile-ro+cl", "channels_last,compile=reduce-overhead", compile_est_s=60),  # inductor's own graphs
    Case("tiny+compile+cl+graph", "channels_last,compile", graph=True, tiny=True, compile_est_s=30),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Deadline(BaseException):  # not an Exception: GraphCache's capture fallback must not swallow it
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Deadline in this thread after `seconds` (a compile that would blow the budget is cut short)."""
    def fire(*_):
        raise Deadline(f"over {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build_models(tiny: bool, device: str, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKL, AutoencoderTiny

    from nitrofusion.models import quiet_libraries

    quiet_libraries()  # diffusers warns about casting freshly built models with .to(dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        full = AutoencoderKL(**(TINY_VAE if tiny else SDXL_VAE))
        small = AutoencoderTiny(**({"decoder_block_out_channels": (8, 8, 8, 8)} if tiny else {}))  # TAESD layout
    full.encoder = None  # decode only: the encoder is not part of any case
    small.encoder = None
    return full.eval().requires_grad_(False).to(dtype), small.eval().requires_grad_(False).to(dtype)


def postprocess(kernels_ok: bool, case: Case):
    from kernels.postprocess import to_uint8, to_uint8_ref

    # The two are bit-identical (tests/test_kernels_*); the fused one is today's GPU path.
    return to_uint8 if kernels_ok and case.name not in ("eager", "channels_last") else to_uint8_ref


def time_calls(fn, cuda: bool, min_runs: int, max_runs: int, max_s: float) -> list[float]:
    """ms per call: CUDA events on the GPU, wall time on the CPU; at least min_runs, then until max_s."""
    out, t0 = [], time.perf_counter()
    while len(out) < max_runs and (len(out) < min_runs or time.perf_counter() - t0 < max_s):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            s = time.perf_counter()
            fn()
            out.append(1000 * (time.perf_counter() - s))
    return out


def run_case(case: Case, models, shapes, args, cuda: bool, refs: dict, left_s) -> list[dict]:
    from kernels.cuda_graphs import CudaGraphCapturer, GraphCache

    full, small = models
    # On the CPU the kernels and graphs are GPU-only: such cases run plain there (today's CPU path), noted.
    opts = DecoderOptions.parse(case.spec, kernels=case.kernels and cuda, compile_backend=args.compile_backend)
    vae = copy.deepcopy(small if case.tiny else full)
    try:
        prep = prepare_decoder(vae, opts, graphs=case.graph)
    except Exception as e:  # noqa: BLE001 - reported in the table, the other cases still run
        return [{"case": case.name, "size": s, "batch": b, "spec": case.spec, "skipped": {},
                 "skip": f"failed to prepare: {type(e).__name__}: {e}"[:200]} for s, b in shapes]
    skipped = dict(prep.skipped)
    skipped.update({k: "GPU only (CPU run)" for k, on in (("kernels", case.kernels), ("graph", case.graph))
                    if on and not cuda})
    post = postprocess(cuda and "kernels" not in skipped, case)
    def fn(z):  # what a graph holds; with the fp16 guard also the finite flags, checked on the host by finish()
        if not prep.guarded:
            return post(prep(z))
        image, ok = prep.decode_flagged(z)
        return post(image), ok

    def finish(z, out):
        return prep.repair(z, *out, post=post) if prep.guarded else out
    graphs = GraphCache(fn, (1, 2, 4, 8), "vae", CudaGraphCapturer()) if case.graph and cuda else None
    rows = []
    for size, batch in shapes:
        row = {"case": case.name, "size": size, "batch": batch, "spec": case.spec, "kernels": case.kernels,
               "graph": case.graph, "applied": list(prep.applied), "skipped": skipped}
        rows.append(row)
        if opts.compile and (size, batch) not in args.compile_shapes:
            row["skip"] = "compile shapes: " + ",".join(f"{s}:{b}" for s, b in sorted(args.compile_shapes))
            continue
        # Compile estimates are for the GPU's inductor; the CPU smoke run compiles with dynamo only (seconds).
        est = (case.compile_est_s if cuda else 2.0 * bool(opts.compile)) + (3 if cuda else 0.5)
        if left_s() < est:
            row["skip"] = f"budget ({left_s():.0f} s left, ~{est:.0f} s needed)"
            continue
        g = torch.Generator("cpu").manual_seed(args.seed + size + batch)
        latents = torch.randn(batch, 4, size // 8, size // 8, generator=g)  # UNet space, unit scale
        z = (latents if case.tiny else latents / vae.config.scaling_factor).to(args.device, args.dtype)
        call = (lambda z=z: finish(z, graphs(z) if graphs is not None else fn(z)))  # noqa: E731
        try:
            with torch.inference_mode():
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                with deadline(max(1.0, left_s())) if opts.compile else contextlib.nullcontext():
                    call()
                    if cuda:
                        torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t0, 2)
                for _ in range(args.warmup):
                    out = call()
                ms = time_calls(call, cuda, args.min_runs, args.max_runs, args.max_s)
                out = call().cpu()
        except Deadline as e:
            row["skip"] = f"compile cut at the budget ({e})"
            torch._dynamo.reset()
            break
        except Exception as e:  # noqa: BLE001 - one failing option must not lose the rest of the table
            row["skip"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"{case.name} {size}^2 b{batch}: {row['skip']}")
            continue
        row.update(ms=statistics.median(ms), runs=len(ms), runs_ms=[round(m, 3) for m in ms],
                   peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
        if graphs is not None:
            row["graph_summary"] = graphs.summary()
            if graphs.failed:
                row["graph_failed"] = min(graphs.failed.values())[:160]
        if prep.guarded:
            row["fp16_fallback_rows"] = prep.fallback_rows
        key = (size, batch)
        if case.tiny:
            row["diff"] = "another decoder"
        elif key not in refs:
            refs[key] = (case.name, out)
            row["saturated"] = float(((out == 0) | (out == 255)).float().mean())
        else:
            ref_name, ref = refs[key]
            d = (out.to(torch.int16) - ref.to(torch.int16)).abs()
            row.update(ref=ref_name, max_diff=int(d.max()), px_differ=float((d.amax(dim=-1) > 0).float().mean()))
        log(f"{case.name:40s} {size}^2 b{batch}: {row['ms']:.2f} ms (first call {row['first_call_s']} s)"
            + (f" max diff {row['max_diff']}, {100 * row['px_differ']:.3f}% px" if "max_diff" in row else ""))
    if opts.compile and args.cache_check and not args.cache_checked and any("ms" in r for r in rows):
        try:  # a cache hit takes seconds; a miss would be a second cold compile: cut at the budget too
            with deadline(max(5.0, left_s())):
                args.cache_checked = recompile_time(case, models, args, next(r for r in rows if "ms" in r))
        except Deadline as e:
            next(r for r in rows if "ms" in r)["skip"] = f"recompile from cache cut at the budget ({e})"
    prep.undo()
    if graphs is not None:
        graphs.graphs.clear()  # free this case's graphs (and their pool) before the next case's peak memory
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()
    return rows


def recompile_time(case: Case, models, args, r: dict) -> bool:
    """Forget the compiled code (as a restart would) and compile row r's shape again: inductor's FX graph cache
    on disk should turn minutes into seconds. Stored in r."""
    torch._dynamo.reset()
    vae = copy.deepcopy(models[1] if case.tiny else models[0])
    prep = prepare_decoder(vae, DecoderOptions.parse(case.spec, kernels=case.kernels,
                                                     compile_backend=args.compile_backend))
    z = torch.zeros(r["batch"], 4, r["size"] // 8, r["size"] // 8, device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            prep(z)
        if args.device == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001
        r["skip"] = f"recompile failed: {type(e).__name__}: {str(e)[:120]}"
        return True
    r["recompile_from_cache_s"] = round(time.perf_counter() - t0, 2)
    log(f"{case.name}: compiled again from the on-disk cache in {r['recompile_from_cache_s']} s (cold: "
        f"{r['first_call_s']} s)")
    prep.undo()
    return True


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random VAE on the CPU (smoke run, under a minute)")
    ap.add_argument("--sizes", default=None, help="square sizes (default 1024,512; tiny 64,32)")
    ap.add_argument("--batches", default=None, help="default 1,8 (tiny 1,2)")
    ap.add_argument("--cases", default=None, help="comma list of case names (default: all)")
    ap.add_argument("--compile-shapes", default=None, help="size:batch shapes compile cases run (default "
                    "1024:1; tiny 64:1): static shapes compile once each")
    ap.add_argument("--compile-backend", default=None, help="default inductor (tiny: eager, dynamo only)")
    ap.add_argument("--inductor-cache", default=None, help="TORCHINDUCTOR_CACHE_DIR (default: a fresh temp dir)")
    ap.add_argument("--no-cache-check", dest="cache_check", action="store_false")
    ap.add_argument("--warmup", type=int, default=None, help="calls after the first, untimed (default 2; tiny 1)")
    ap.add_argument("--min-runs", type=int, default=None, help="default 3 (tiny 2)")
    ap.add_argument("--max-runs", type=int, default=20)
    ap.add_argument("--max-s", type=float, default=None, help="timing per shape beyond the minimum runs "
                    "(default 0.5 s; tiny 0.1)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip what would run past this (default 150; "
                    "tiny 45): compile cases come last and are cut at the budget")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None, help="append the section here (default: print only)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t = args.tiny
    args.sizes = [int(s) for s in (args.sizes or ("64,32" if t else "1024,512")).split(",")]
    args.batches = [int(b) for b in (args.batches or ("1,2" if t else "1,8")).split(",")]
    args.min_runs = args.min_runs or (2 if t else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if t else 2)
    args.budget_s = args.budget_s or (45 if t else 150)
    args.max_s = args.max_s if args.max_s is not None else (0.1 if t else 0.5)
    args.compile_shapes = {tuple(int(v) for v in s.split(":"))
                           for s in (args.compile_shapes or ("64:1" if t else "1024:1")).split(",") if s}
    args.compile_backend = args.compile_backend or ("eager" if t else "inductor")
    args.device = "cpu" if t or not torch.cuda.is_available() else "cuda"
    args.dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    names = [c.name for c in CASES]
    args.cases = args.cases.split(",") if args.cases else names
    if bad := [c for c in args.cases if c not in names]:
        ap.error(f"unknown case {bad[0]!r}; cases: {', '.join(names)}")
    args.cache_checked = False
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if not cuda and not args.tiny:
        print("bench: the full-size decoder needs a CUDA device; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = args.inductor_cache or tempfile.mkdtemp(prefix="vae-inductor-")
    threads = torch.get_num_threads()
    if not cuda:  # one thread: steadier on a shared CPU, and the smoke run's tiny convolutions gain nothing from more
        torch.set_num_threads(1)
    t_start = time.monotonic()
    card = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    models = build_models(args.tiny, args.device, args.dtype, args.seed)
    shapes = [(s, b) for s in args.sizes for b in args.batches]
    results, refs, complete = [], {}, False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still write what was measured

    def left_s() -> float:
        return args.budget_s - (time.monotonic() - t_start)

    try:
        for case in (c for c in CASES if c.name in args.cases):
            log(f"case {case.name} ({left_s():.0f} s of budget left)")
            results += run_case(case, models, shapes, args, cuda, refs, left_s)
        complete = True
    finally:
        torch.set_num_threads(threads)
        meta = {"card": card, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "tiny": args.tiny,
                "dtype": str(args.dtype).replace("torch.", ""), "versions": versions(), "complete": complete,
                "elapsed_s": round(time.monotonic() - t_start, 1), "budget_s": args.budget_s,
                "command": "python bench/vae_decoder.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        table = markdown(meta, results, shapes)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
