"""Stage-3 training benchmark on the SDXL architecture (issue 14): what one card does per NitroFusion iteration.

The real SDXL-base UNet (public config, bench/gpu_pipeline.py's SDXL_UNET; random weights, nothing downloaded;
timing does not depend on weight values) as the student: fp32 master weights, bf16 autocast, gradient
checkpointing, AdamW (`--adam8bit`: bitsandbytes). A second one as the teacher, whose encoder (conv_in, down
blocks, mid block) is the discriminator's frozen backbone, stored in bf16. The head pool at the paper's size:
4 t* x 10 feature levels x 3 tasks x 4 replicas = 480 heads (paper Sec. 3.2), width `--head-channels`. Each
iteration runs the trainer's own code (trainer/nitro_step.py): draw t*, sample 30 heads, refresh 1% of the pool,
the student's one-step x0 with SDXL conditioning (prompt embeddings, pooled embedding, time ids), the generator's
backward through the frozen encoder into the student, the student's optimizer step, the discriminator update.

For 1024^2 and 512^2: micro-batch 1, 2, 4, 5 (the paper's: 5 x 20 accumulation on one A100 80 GB), then the
largest that fits, searched upward and bisected, catching out-of-memory. The allocator is capped at
`--memory-cap-gib` (default 78: what an 80 GB card leaves PyTorch), so on a larger card the answer is still the
80 GB one. Per case: median seconds per iteration, images/s, peak GiB, and the parts (generator backward,
student optimizer step, discriminator step): with k-step accumulation an iteration costs about
k x (generator + discriminator) + one optimizer step.

    python bench/train_sdxl.py --json /tmp/train_sdxl.json --markdown BENCHMARKS.md    # one GPU, ~3 minutes
    python bench/train_sdxl.py --tiny                      # the same code on tiny SDXL models, CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repository (trainer/, nitrofusion/) and bench/ (gpu_pipeline)


def log(msg: str) -> None:
    print(f"[train_sdxl] {msg}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny SDXL-family UNets (nitrofusion.tiny) on the CPU")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides (default 1024 512; tiny 64 32)")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="micro-batches before the search (default 1 2 4 5; tiny 1 2)")
    p.add_argument("--max-batch", type=int, default=None, help="the upward search stops here (default 64; tiny 3)")
    p.add_argument("--steps", type=int, default=1, help="student steps per iteration (bottom-up phase k; default 1)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case (default 3; tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 1; tiny 0)")
    p.add_argument("--case-budget-s", type=float, default=25.0, help="stop timing a case after this long")
    p.add_argument("--budget-s", type=float, default=None, help="whole run, build included (default 150; tiny 45)")
    p.add_argument("--memory-cap-gib", type=float, default=78.0, help="allocator cap on a GPU (0: the whole card)")
    p.add_argument("--head-channels", type=int, default=None, help="head width (default 64; tiny 8)")
    p.add_argument("--heads-per-slot", type=int, default=4, help="replicas per (t*, level, task): 4 -> 480 heads")
    p.add_argument("--adam8bit", action="store_true", help="bitsandbytes AdamW8bit for the student")
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH", help="append a section (e.g. BENCHMARKS.md)")
    a = p.parse_args(argv)
    t = a.tiny
    a.sizes = a.sizes or ([64, 32] if t else [1024, 512])
    a.batches = a.batches or ([1, 2] if t else [1, 2, 4, 5])
    a.max_batch = a.max_batch or (3 if t else 64)
    a.iters = a.iters or (1 if t else 3)
    a.warmup = (0 if t else 1) if a.warmup is None else a.warmup
    a.budget_s = a.budget_s or (45.0 if t else 150.0)
    a.head_channels = a.head_channels or (8 if t else 64)
    return a


class Bench:
    """The student, the frozen encoder and their optimizers, built once; a head pool per resolution."""

    def __init__(self, args):
        from diffusers import UNet2DConditionModel

        from nitrofusion.sampler import LCMSampler
        from trainer.config import OptimConfig, RunConfig
        from trainer.discriminator import FrozenEncoder
        from trainer.loop import make_accelerator
        from trainer.models import alphas_cumprod
        from trainer.skeleton import make_optimizer

        self.args = args
        self.cuda = not args.tiny
        if args.tiny:  # toy models are per-op overhead: one thread beats two fighting over shared cores (20x here)
            torch.set_num_threads(1)
        self.dev = torch.device("cuda" if self.cuda else "cpu")
        # bf16 autocast and a bf16 frozen encoder on the CPU too: --tiny runs the GPU's dtype path
        self.acc = make_accelerator(RunConfig(device="cuda" if self.cuda else "cpu", mixed_precision="bf16"))
        torch.manual_seed(args.seed)

        def unet():
            if args.tiny:
                from nitrofusion.tiny import tiny_unet

                return tiny_unet("sdxl", sample_size=args.sizes[0] // 8)
            import gpu_pipeline  # bench/ is on sys.path when this file runs as a script or via load_script

            with self.dev:  # random init on the card: seconds, not the CPU's minutes
                return UNet2DConditionModel(**gpu_pipeline.SDXL_UNET)

        self.student = unet().to(self.dev).train()
        teacher = unet().to(self.dev)
        if args.checkpointing:
            self.student.enable_gradient_checkpointing()
            teacher.enable_gradient_checkpointing()  # the generator's gradient runs back through its encoder
        self.encoder = FrozenEncoder(teacher, dtype=torch.bfloat16)
        del teacher  # its decoder half is not needed: only the encoder's modules stay referenced
        self.optim = OptimConfig(steps=1, lr=1e-6, warmup=0, optimizer="adamw8bit" if args.adam8bit else "adamw")
        self.opt_g = make_optimizer(self.student.parameters(), self.optim)
        self.sampler = LCMSampler(alphas_cumprod())
        self.pool = self.opt_d = None
        self.gen = torch.Generator().manual_seed(args.seed)

    def params(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        out = {"student_M": round(count(self.student) / 1e6, 1), "encoder_M": round(count(self.encoder) / 1e6, 1)}
        if self.pool is not None:
            out.update(pool_heads=len(self.pool), pool_M=round(count(self.pool) / 1e6, 1),
                       sampled=len(self.pool.sample(self.cfg.pool.timesteps[0], torch.Generator())))
        return out

    def set_resolution(self, size: int) -> None:
        """A new head pool for this latent size (a head's depth follows its feature map's side)."""
        from trainer.config import NitroConfig, PoolConfig
        from trainer.discriminator import HeadPool

        self.pool = self.opt_d = None
        free(self.cuda)
        a = self.args
        self.cfg = NitroConfig(pool=PoolConfig(heads_per_slot=a.heads_per_slot, head_channels=a.head_channels),
                               reg_weight=0.0, phase_steps=(1,) * a.steps, optim=self.optim)  # the paper: no L2
        with self.dev:
            self.pool = HeadPool(self.cfg.pool, self.encoder.shapes(size // 8)).to(self.dev)
        self.opt_d = torch.optim.AdamW(self.pool.parameters(), lr=1e-4, betas=(0.0, 0.99))
        self.size = size

    def batch(self, b: int):
        """One iteration's plan and rows: random latents and SDXL conditioning of the real shapes."""
        from trainer.conditioning import Conditioning, to, zero_conditioning
        from trainer.nitro_step import Batch, Plan, draw_noises

        c, gen, lat = self.cfg, self.gen, self.size // 8
        t_star = c.pool.timesteps[int(torch.randint(len(c.pool.timesteps), (1,), generator=gen))]
        heads = self.pool.sample(t_star, gen)
        self.pool.refresh(gen, self.opt_d)
        plan = Plan(t_star, heads, self.args.steps, 0.0, self.pool.tasks_of(heads))
        shape = (b, self.encoder.latent_channels, lat, lat)
        cfg = self.encoder.config
        zero = zero_conditioning(cfg, b, 77, self.size)
        cond = Conditioning(torch.randn(zero.embeds.shape, generator=gen),
                            None if zero.pooled is None else torch.randn(zero.pooled.shape, generator=gen),
                            zero.time_ids)
        x = torch.randn(shape, generator=gen)
        renoise, g_views, d_views = draw_noises(gen, shape, plan, c)
        on = lambda v: v.__class__(v.noise.to(self.dev), v.ys, v.xs, v.side)  # noqa: E731
        cond, zero = to(cond, self.dev), to(zero, self.dev)
        return plan, Batch(x.to(self.dev), x.to(self.dev), ["p"] * b, cond, x.to(self.dev), cond, zero,
                           [z.to(self.dev) for z in renoise], on(g_views), [(on(r), on(f)) for r, f in d_views])

    def iteration(self, b: int) -> dict[str, float]:
        """One stage-3 iteration (micro-batch b, no accumulation), its parts timed."""
        from trainer.nitro_step import discriminator_step, generator_backward
        from trainer.skeleton import step_optimizer

        nets = self.nets()
        plan, batch = self.batch(b)
        times, t0 = {}, self.clock()
        fake, _ = generator_backward(nets, plan, batch, self.cfg, b)
        times["gen_s"], t0 = self.clock() - t0, self.clock()
        step_optimizer(self.acc, self.opt_g, self.student.parameters(), self.optim)
        self.opt_d.zero_grad(set_to_none=True)
        times["opt_s"], t0 = self.clock() - t0, self.clock()
        discriminator_step(nets, plan, batch, fake, self.cfg, b)
        times["disc_s"] = self.clock() - t0
        return times

    def nets(self):
        from trainer.nitro_step import NitroNets

        return NitroNets(self.acc, self.student, self.student, self.encoder, self.pool, self.pool, self.opt_g,
                         self.opt_d, self.sampler)

    def clock(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_case(bench: Bench, b: int, args, deadline: float, iters: int | None = None) -> dict:
    """--warmup iterations, then up to `iters` (--iters) timed ones within the case budget. Out of memory -> oom."""
    iters = iters or args.iters
    if bench.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    runs: list[dict] = []
    oom = False
    try:
        for _ in range(args.warmup):  # kernels chosen, optimizer state allocated
            bench.iteration(b)
        while len(runs) < iters and (not runs or time.monotonic() - start < args.case_budget_s) \
                and time.monotonic() < deadline:
            runs.append(bench.iteration(b))
    except (torch.cuda.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        oom = True
    if oom:  # outside the except block: its traceback no longer holds the failed iteration's tensors
        bench.opt_g.zero_grad(set_to_none=True)
        bench.opt_d.zero_grad(set_to_none=True)
        free(bench.cuda)
        return {"size": bench.size, "batch": b, "status": "oom"}
    peak = torch.cuda.max_memory_allocated() / 2**30 if bench.cuda else None
    if not runs:
        return {"size": bench.size, "batch": b, "status": "budget"}
    parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    s = statistics.median(sum(r.values()) for r in runs)
    return {"size": bench.size, "batch": b, "status": "ok", "s_per_iter": s, "images_per_s": b / s,
            "peak_gib": peak, "runs": len(runs), **parts}


def search(bench: Bench, fits: int, args, deadline: float, record) -> int:
    """Largest micro-batch that fits: grow x1.5 from the last fitting one, then bisect, one timed iteration per
    case (the question is fit or not). Returns the largest that fitted."""
    lo, hi = fits, None
    while time.monotonic() < deadline:
        b = min(args.max_batch, math.ceil(lo * 1.5)) if hi is None else (lo + hi) // 2
        if b <= lo or (hi is not None and b >= hi):
            break
        r = record(run_case(bench, b, args, deadline, iters=1))
        if r["status"] == "ok":
            lo = b
        elif r["status"] == "oom":
            hi = b
        else:
            break
    return lo


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("train_sdxl: SDXL-size runs need a CUDA device; use --tiny for the CPU run", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    end = t_start + args.budget_s
    card = torch.cuda.get_device_name() if not args.tiny else (platform.processor() or "cpu")
    if not args.tiny and args.memory_cap_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
    results: list[dict] = []
    largest: dict[int, str] = {}

    def record(r: dict) -> dict:
        results.append(r)
        if r["status"] == "ok":
            log(f"{r['size']}^2 b{r['batch']}: {r['s_per_iter']:.3f} s/iter, {r['images_per_s']:.2f} img/s, "
                f"peak {_f(r['peak_gib'], 1)} GiB (gen {r['gen_s']:.3f}, opt {r['opt_s']:.3f}, disc {r['disc_s']:.3f})")
        else:
            log(f"{r['size']}^2 b{r['batch']}: {r['status']}")
        return r

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still write what was measured
    complete, meta_params = False, {}
    try:
        bench = Bench(args)
        log(f"built in {time.monotonic() - t_start:.1f} s on {card}: {bench.params()}")
        for n, size in enumerate(args.sizes):
            # Each resolution gets an equal share of what is left, so a slow first one cannot starve the next.
            deadline = time.monotonic() + (end - time.monotonic()) / (len(args.sizes) - n)
            bench.set_resolution(size)
            meta_params[size] = bench.params()
            fits = 0
            for b in args.batches:
                r = record(run_case(bench, b, args, deadline)) if time.monotonic() < deadline else None
                if r is None or r["status"] != "ok":
                    break
                fits = b
            if fits == args.batches[-1] and fits < args.max_batch:
                fits = search(bench, fits, args, deadline, record)
            oom = [r["batch"] for r in results if r["size"] == size and r["status"] == "oom"]
            largest[size] = (f"{fits}" + (f" ({min(oom)} does not)" if oom else
                                          " (search stopped: max batch or budget)") if fits else "none")
        complete = True
    finally:
        meta = {"card": card, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "tiny": args.tiny,
                "versions": versions(), "elapsed_s": round(time.monotonic() - t_start, 1), "complete": complete,
                "params": meta_params, "largest": largest, "args": vars(args)}
        table = markdown(meta, results)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        if args.markdown:
            with open(args.markdown, "a") as f:
                f.write("\n" + table)
    return 0


def versions() -> dict:
    import diffusers

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def markdown(meta: dict, results: list[dict]) -> str:
    a, v = meta["args"], meta["versions"]
    pool = next(iter(meta["params"].values()), {})
    cap = f"allocator capped at {a['memory_cap_gib']:g} GiB" if a["memory_cap_gib"] and not meta["tiny"] else "no cap"
    lines = [
        (f"## Stage-3 training, SDXL architecture: {meta['card']}, {meta['date']}"
        f"{' (tiny CPU run)' if meta['tiny'] else ''}{'' if meta['complete'] else ' (PARTIAL: stopped early)'}"),
        "",
        (f"`python bench/train_sdxl.py{' --tiny' if meta['tiny'] else ''}` - torch {v['torch']} (CUDA {v['cuda']}), "
        f"diffusers {v['diffusers']}. Student: SDXL UNet ({pool.get('student_M')}M), fp32 weights + bf16 autocast, "
        f"gradient checkpointing {'on' if a['checkpointing'] else 'off'}, {'AdamW8bit' if a['adam8bit'] else 'AdamW'}; "
        f"frozen teacher encoder ({pool.get('encoder_M')}M) in bf16; {pool.get('pool_heads')} heads "
        f"({pool.get('pool_M')}M at the first size, width {a['head_channels']}), {pool.get('sampled')} sampled per iteration, 1% "
        f"refreshed; {a['steps']}-step generation; {cap}. One iteration = generator backward + student optimizer "
        "step + discriminator step, micro-batch b, no accumulation; median of the timed iterations."),
        "",
        "| size | micro-batch | s/iteration | images/s | peak GiB | generator s | optimizer s | discriminator s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (-r["size"], r["batch"])):
        if r["status"] != "ok":
            lines.append(f"| {r['size']}^2 | {r['batch']} | {r['status']} | | | | | |")
            continue
        lines.append(f"| {r['size']}^2 | {r['batch']} | {r['s_per_iter']:.3f} | {r['images_per_s']:.2f} | "
                     f"{_f(r['peak_gib'], 1)} | {r['gen_s']:.3f} | {r['opt_s']:.3f} | {r['disc_s']:.3f} |")
    lines += ["", "Largest micro-batch that fits: " + "; ".join(f"{s}^2: {t}" for s, t in meta["largest"].items())
              + f". Whole run {meta['elapsed_s']} s."]
    return "\n".join(lines) + "\n"


def _f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


if __name__ == "__main__":
    sys.exit(main())
