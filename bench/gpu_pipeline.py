"""GPU pipeline benchmark (issue 6): one script, one run, one card.

SDXL architecture with random weights (configs written below, from the public stabilityai/stable-diffusion-
xl-base-1.0 model; nothing is downloaded; timing does not depend on weight values). For 1024^2 and 512^2,
steps 1 and 4, batch 1 / 4 / 8, in one process:

  ours            nitrofusion Pipeline (generation.generate) on TorchBackend, fused kernels + CUDA graphs
  ours-fast       the same with `decoder: fast`: a TAESDXL-shaped AutoencoderTiny (random weights) as the decoder
  ours-host       ours with each row's latents copied to the host and back around every step (a sync each
                  step): what keeping latents on the device saves
  ours-notext     ours with the text encoders run eagerly (their CUDA graphs off): what those graphs save
  ours-vaeopt     ours with decoder options from $NITRO_VAE_CANDIDATE (kernels/vae_fast.py; default
                  channels_last,cudnn_benchmark,subpixel): the end-to-end effect of a decoder-option candidate
  ours-eager      the same engine with kernels and graphs off (what the CPU path runs)
  diffusers       StableDiffusionXLPipeline, eager fp16, guidance 0, LCMScheduler
  diffusers-compile   the same with torch.compile on its UNet and VAE decoder (compiles per shape: only
                      the cases in --compile-cases, and only while --budget-s lasts)

Per case: median prompt -> image time (ours: uint8 HWC arrays; diffusers: PIL images, its default output),
images/s, per-stage times (text, UNet, VAE, postprocess) from CUDA events, peak GPU memory. A section is
appended to --markdown (default BENCHMARKS.md on a GPU; --tiny prints only), details go to --json.

    python bench/gpu_pipeline.py                         # on the GPU machine (see bench/device_run.sh)
    python bench/gpu_pipeline.py --tiny                  # tiny random models on the CPU, under a minute
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

# -- SDXL base configs (public config.json files), trimmed to the fields that shape the model ---------------
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-5, "norm_num_groups": 32, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SDXL_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}
CLIP_BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
             "hidden_act": "gelu", "projection_dim": 1280}
SHIFT = 250


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- models -----------------------------------------------------------------------------------------------
def _text_encoders(tok, device):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def cfg(arch):
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, eos_token_id=eos,
                              bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"), pad_token_id=eos, **arch)

    with torch.device(device):
        return CLIPTextModel(cfg(CLIP_L)), CLIPTextModelWithProjection(cfg(CLIP_BIGG))


def build_components(tiny: bool, device: str, seed: int):
    """(unet, vae, [te1, te2], [tok1, tok2], scheduler_config): SDXL-sized, or nitrofusion.tiny's SDXL."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nitrofusion.tiny import tiny_pipeline, tiny_scheduler, tiny_tokenizer

    torch.manual_seed(seed)
    if tiny:
        p = tiny_pipeline("sdxl", seed=seed)
        return p.unet, p.vae, [p.text_encoder, p.text_encoder_2], [p.tokenizer, p.tokenizer_2], dict(p.scheduler.config)
    toks = [tiny_tokenizer(), tiny_tokenizer()]  # byte-level BPE: any prompt tokenises; ids < CLIP's vocab
    with torch.device(device):  # random init directly on the GPU (seconds, not minutes)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
    te1, te2 = _text_encoders(toks[0], device)
    return unet, vae, [te1, te2], toks, dict(tiny_scheduler().config)


def build_tiny_decoder(tiny: bool, device: str):
    """TAESDXL's layout (diffusers' AutoencoderTiny defaults: 4 latent channels, 8x upsampling), random weights;
    `tiny`: nitrofusion.tiny's 2x one, matching the tiny VAE."""
    from diffusers import AutoencoderTiny

    from nitrofusion.tiny import tiny_preview_decoder

    if tiny:
        return tiny_preview_decoder()
    with torch.device(device):
        return AutoencoderTiny()


def diffusers_pipeline(parts, device: str, dtype: torch.dtype):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    unet, vae, (te1, te2), (tok1, tok2), sched_cfg = parts
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=LCMScheduler.from_config(sched_cfg))
    # fp16 VAE without diffusers' per-call fp32 upcast (as with the fp16-fix VAE); with force_upcast it would
    # convert the VAE to fp32 and back on every call, and torch.compile would recompile each time.
    pipe.vae.register_to_config(force_upcast=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def our_pipeline(parts, device: str, dtype: str, kernels: bool, cuda_graphs: bool, preview_vae=None):
    from nitrofusion.backends.torch_backend import TorchBackend
    from nitrofusion.models import LoadedModel
    from nitrofusion.pipeline import Pipeline
    from nitrofusion.sampler import LCMSampler

    unet, vae, tes, toks, sched_cfg = parts
    model = LoadedModel(path=Path("sdxl-random"), family="sdxl", unet=unet, vae=vae, text_encoders=tes,
                        tokenizers=toks, scheduler_config=sched_cfg, shift=SHIFT, preview_vae=preview_vae)
    backend = TorchBackend(model, device=device, dtype=dtype, kernels=kernels, cuda_graphs=cuda_graphs)
    return Pipeline(model, backend, LCMSampler.from_scheduler_config(sched_cfg))


# -- timing ----------------------------------------------------------------------------------------------
class StageTimer:
    """Per-stage time: CUDA events around each call on a GPU, synchronized wall time on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans: dict[str, list] = defaultdict(list)
        self._undo: list = []

    def _start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _stop(self, stage, start):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans[stage].append((start, e))
        else:
            self.spans[stage].append(1000 * (time.perf_counter() - start))

    def wrap(self, obj, attr: str, stage: str) -> None:
        """Time every call of obj.attr (an instance attribute shadows the method; undone by restore())."""
        fn = getattr(obj, attr)
        had = attr in vars(obj)

        def timed(*a, **k):
            s = self._start()
            out = fn(*a, **k)
            self._stop(stage, s)
            return out

        setattr(obj, attr, timed)
        self._undo.append(lambda: setattr(obj, attr, fn) if had else delattr(obj, attr))

    def hook(self, module, stage: str) -> None:
        box = []
        h1 = module.register_forward_pre_hook(lambda m, a: box.append(self._start()))
        h2 = module.register_forward_hook(lambda m, a, o: self._stop(stage, box.pop()))
        self._undo += [h1.remove, h2.remove]

    def reset(self) -> None:
        self.spans.clear()

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self.spans.items()}
        return {k: sum(v) for k, v in self.spans.items()}

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def measure(run, timer: StageTimer, cuda: bool, warmup: int, runs: int, batch: int) -> dict:
    """Median wall time of `run(i)` and the per-stage medians; memory peak over the timed runs."""
    for i in range(warmup):
        run(-1 - i)
    sync(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    walls, stages = [], defaultdict(list)
    for i in range(runs):
        timer.reset()
        sync(cuda)
        t0 = time.perf_counter()
        run(i)
        sync(cuda)
        walls.append(1000 * (time.perf_counter() - t0))
        for k, v in timer.totals_ms().items():
            stages[k].append(v)
    ms = statistics.median(walls)
    return {"ms": ms, "images_per_s": batch * 1000 / ms, "runs_ms": walls,
            "stages_ms": {k: statistics.median(v) for k, v in stages.items()},
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


_PROMPT_IDS = itertools.count()


def prompts(batch: int, i: int) -> list[str]:
    # Prompts never repeat within the process: no system reuses text embeddings (ours caches them per prompt).
    return [f"a photo of a cat, run {i} image {j} #{next(_PROMPT_IDS)}" for j in range(batch)]


# -- the systems ---------------------------------------------------------------------------------------------
def run_ours(pipe, timer, size, steps, batch, args, cuda, decoder: str = "full"):
    from nitrofusion.generation import GenerationRequest

    def run(i):
        reqs = [GenerationRequest(p, steps, seed=1000 * (i + 10) + j, width=size, height=size, decoder=decoder)
                for j, p in enumerate(prompts(batch, i))]
        images = pipe(reqs)
        assert len(images) == batch and images[0].shape == (size, size, 3)

    return measure(run, timer, cuda, args.warmup, args.runs, batch)


def run_diffusers(pipe, timer, size, steps, batch, args, cuda):
    def run(i):
        out = pipe(prompt=prompts(batch, i), num_inference_steps=steps, guidance_scale=0.0, height=size,
                   width=size, output_type="pil", generator=torch.Generator("cpu").manual_seed(max(i, 0)))
        assert len(out.images) == batch

    return measure(run, timer, cuda, args.warmup, args.runs, batch)


def time_ours(pipe, timer: StageTimer) -> None:
    b = pipe.backend
    timer.wrap(b, "encode_text", "text")
    timer.wrap(b, "unet", "unet")
    timer.wrap(b, "decode_with", "vae+post")  # decoder + uint8 postprocess + host copy (one graph when captured)


def host_round_trip():
    """Patch the step loop so each row's latents go to the host and back around every step (with the sync that
    implies), as before rows kept them on the device. Returns the undo function."""
    import nitrofusion.generation as gen

    real = gen.step_rows

    def step_rows(backend, sampler, rows, pad_to=None):
        for r in rows:
            r.latents = r.latents.to(backend.device)
        out = real(backend, sampler, rows, pad_to)
        for r in rows:
            r.latents, r.x0 = r.latents.cpu(), r.x0.cpu()
        return out

    gen.step_rows = step_rows
    return lambda: setattr(gen, "step_rows", real)


def time_diffusers(pipe, timer: StageTimer) -> None:
    timer.wrap(pipe, "encode_prompt", "text")
    timer.hook(pipe.unet, "unet")
    timer.wrap(pipe.vae, "decode", "vae")
    timer.wrap(pipe.image_processor, "postprocess", "post")


# -- main ---------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke run)")
    ap.add_argument("--sizes", default=None, help="comma list of square sizes (default 1024,512; tiny 32,16)")
    ap.add_argument("--steps", default="1,4")
    ap.add_argument("--batches", default=None, help="default 1,4,8 (tiny 2)")
    ap.add_argument("--systems", default=None, help="default ours,ours-fast,diffusers,ours-host,ours-notext,"
                    "ours-eager,diffusers-compile (tiny: no ours-eager, which on the CPU is the same as ours)")
    ap.add_argument("--variant-cases", default=None, help="size:steps:batch cases the ours-host / ours-notext / "
                    "ours-eager variants run (default 1024:1:1,512:1:1,1024:1:8; tiny 32:1:2)")
    ap.add_argument("--compile-cases", default=None,
                    help="size:batch:steps cases torch.compile runs, it compiles per shape (default 1024:1:1,"
                         "512:1:1; tiny 16:2:1)")
    ap.add_argument("--compile-backend", default=None, help="default inductor (tiny: eager, i.e. dynamo only)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=None, help="timed runs per case (default 5; tiny 1)")
    ap.add_argument("--budget-s", type=float, default=330, help="skip cases (compile first) past this")
    ap.add_argument("--markdown", default=None, help="append a section here (default BENCHMARKS.md; tiny: none)")
    ap.add_argument("--json", default=None, help="write all measurements here")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t = args.tiny
    args.sizes = [int(s) for s in (args.sizes or ("32,16" if t else "1024,512")).split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    args.batches = [int(s) for s in (args.batches or ("2" if t else "1,4,8")).split(",")]
    args.systems = (args.systems or ("ours,ours-fast,diffusers,ours-host,ours-notext,diffusers-compile" if t else
                                     "ours,ours-fast,diffusers,ours-host,ours-notext,ours-eager,"
                                     "diffusers-compile")).split(",")
    args.variant_cases = {tuple(int(v) for v in c.split(":"))
                          for c in (args.variant_cases or ("32:1:2" if t else "1024:1:1,512:1:1,1024:1:8")).split(",")}
    args.compile_cases = {tuple(int(v) for v in c.split(":"))
                          for c in (args.compile_cases or ("16:2:1" if t else "1024:1:1,512:1:1")).split(",") if c}
    args.compile_backend = args.compile_backend or ("eager" if t else "inductor")
    args.runs = args.runs or (1 if t else 5)
    args.device = args.device or ("cuda" if torch.cuda.is_available() and not t else "cpu")
    if args.markdown is None and not t:
        args.markdown = "BENCHMARKS.md"
    return args


def versions() -> dict:
    import diffusers
    import transformers

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "triton": tv, "python": platform.python_version()}


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = args.device == "cuda"
    if (cuda and not torch.cuda.is_available()) or (not cuda and not args.tiny):
        print("bench: full-size SDXL runs need a CUDA device; use --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    t_start = time.monotonic()
    card = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    dtype_s, dtype = ("float16", torch.float16) if cuda else ("float32", torch.float32)
    log(f"device {card}; {versions()}")
    cases = [(size, steps, batch) for batch in args.batches for size in args.sizes for steps in args.steps]
    results: list[dict] = []

    def over_budget() -> bool:
        return time.monotonic() - t_start > args.budget_s

    def record(system, size, steps, batch, r, note=""):
        row = {"system": system, "size": size, "steps": steps, "batch": batch, **r, "note": note}
        results.append(row)
        st = r.get("stages_ms", {})
        log(f"{system:18s} {size}^2 steps {steps} b{batch}: {r['ms']:.1f} ms, {r['images_per_s']:.2f} img/s "
            + " ".join(f"{k} {v:.1f}" for k, v in st.items()) + (f" ({note})" if note else ""))

    # `timeout` sends SIGTERM: finish through the finally block, so what was measured is still written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    complete = False
    try:
        # Most important first, so a budget cut drops the least: ours (kernels + graphs), diffusers eager, our
        # engine without kernels / graphs, then torch.compile (it compiles per shape: minutes on SDXL).
        # Separate model instances for ours and diffusers: ours patches its modules in place.
        ours_parts = diff_pipe = None
        order = ("ours", "ours-fast", "diffusers", "ours-host", "ours-notext", "ours-vaeopt", "ours-eager",
                 "diffusers-compile")
        for system in [s for s in order if s in args.systems]:
            t0 = time.monotonic()
            undo_patch = None
            if system.startswith("ours"):
                if ours_parts is None:
                    ours_parts = build_components(args.tiny, args.device, args.seed)
                fast = system != "ours-eager" and cuda
                preview = build_tiny_decoder(args.tiny, args.device) if system == "ours-fast" else None
                if system == "ours-vaeopt":  # read by kernels/vae_fast.py when the backend is built
                    os.environ["NITRO_VAE"] = os.environ.get("NITRO_VAE_CANDIDATE",
                                                             "channels_last,cudnn_benchmark,subpixel")
                pipe = our_pipeline(ours_parts, args.device, dtype_s, kernels=fast, cuda_graphs=fast,
                                    preview_vae=preview)
                counts = json.dumps(pipe.backend.accel.patch_counts())
                note = f"kernels+graphs {counts}" if fast else "no kernels/graphs"
                if system == "ours-fast":
                    note = "tiny decoder (TAESDXL layout); " + note
                elif system == "ours-host":
                    undo_patch = host_round_trip()
                    note = "latents to the host and back every step; " + note
                elif system == "ours-notext":
                    pipe.backend.accel.text_graphs = None
                    note = "text encoders eager; " + note
                elif system == "ours-vaeopt":
                    os.environ.pop("NITRO_VAE")
                    note = f"decoder options {os.environ.get('NITRO_VAE_CANDIDATE', 'channels_last,cudnn_benchmark,subpixel')}; " + note
                timer = StageTimer(cuda)
                runner = functools.partial(run_ours, decoder="fast" if system == "ours-fast" else "full")
                time_ours(pipe, timer)
            else:
                if diff_pipe is None:
                    parts = build_components(args.tiny, args.device, args.seed)
                    diff_pipe = diffusers_pipeline(parts, args.device, dtype)
                pipe, note, runner = diff_pipe, "", run_diffusers
                if system == "diffusers-compile":
                    pipe.unet = torch.compile(pipe.unet, backend=args.compile_backend)
                    pipe.vae.decoder = torch.compile(pipe.vae.decoder, backend=args.compile_backend)
                timer = StageTimer(cuda)
                time_diffusers(pipe, timer)
            log(f"{system}: ready in {time.monotonic() - t0:.1f} s {note}")
            for size, steps, batch in cases:
                if system == "diffusers-compile" and (size, batch, steps) not in args.compile_cases:
                    continue
                if system in ("ours-host", "ours-notext", "ours-vaeopt", "ours-eager") and (size, steps, batch) not in \
                        args.variant_cases:
                    continue
                if over_budget():
                    log(f"budget: skipping {system} {size}^2 steps {steps} b{batch}")
                    continue
                t0 = time.monotonic()
                r = runner(pipe, timer, size, steps, batch, args, cuda)
                if system == "diffusers-compile":
                    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
                    note = (f"{args.compile_backend}; case incl. compile {time.monotonic() - t0:.0f} s; "
                            f"{graphs} graphs compiled so far")
                record(system, size, steps, batch, r, note)
            timer.restore()
            if undo_patch is not None:
                undo_patch()
            if system.startswith("ours"):
                acc = pipe.backend.accel
                if acc.unet_graphs is not None:
                    results[-1]["graphs"] = {"unet": acc.unet_graphs.summary(), "vae": acc.vae_graphs.summary()}
                    log(f"graphs: {results[-1]['graphs']}")
                acc.undo()  # the original modules back, graphs and their memory pool dropped
            del pipe
            if cuda:
                torch.cuda.empty_cache()
        complete = True
    finally:
        elapsed = time.monotonic() - t_start
        meta = {"card": card, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "versions": versions(), "dtype": dtype_s, "tiny": args.tiny, "elapsed_s": round(elapsed, 1),
                "complete": complete,
                "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()}}
        table = markdown(meta, results)
        print(table)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
        if args.markdown:
            md = Path(args.markdown)
            if md.name == "BENCHMARKS.md" and not md.exists():
                md.write_text("# Benchmarks\n\nMeasured numbers only; each section names its card, date and versions.\n")
            with open(md, "a") as f:
                f.write("\n" + table)
            log(f"appended to {args.markdown}")
    return 0


def markdown(meta: dict, results: list[dict]) -> str:
    v = meta["versions"]
    lines = [
        (f"## GPU pipeline benchmark: {meta['card']}, {meta['date']}{' (tiny smoke run)' if meta['tiny'] else ''}"
        f"{'' if meta['complete'] else ' (PARTIAL: stopped early)'}"),
        "",
        (f"`python bench/gpu_pipeline.py` - torch {v['torch']} (CUDA {v['cuda']}), diffusers {v['diffusers']}, "
        f"transformers {v['transformers']}, triton {v['triton']}, Python {v['python']}. SDXL architecture, random "
        f"weights, {meta['dtype']}{' (our VAE in bf16)' if meta['dtype'] == 'float16' else ''}, guidance 0. "
        "Time: median prompt -> image (ours: uint8 arrays; diffusers: PIL). Stages from CUDA events, summed per "
        "call; `vae+post` includes the host copy; peak memory includes captured CUDA-graph pools."),
        "",
        "| system | size | steps | batch | ms | images/s | text ms | UNet ms | VAE ms | post ms | peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (-r["size"], r["steps"], r["batch"], r["system"])):
        s = r["stages_ms"]
        vae = s.get("vae", s.get("vae+post"))
        post = s.get("post", "incl." if "vae+post" in s else None)
        cells = [r["system"], f"{r['size']}^2", r["steps"], r["batch"], f"{r['ms']:.1f}", f"{r['images_per_s']:.2f}",
                 _f(s.get("text")), _f(s.get("unet")), _f(vae), post if isinstance(post, str) else _f(post),
                 _f(r["peak_gib"], 2), r.get("note", "")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"Whole run {meta['elapsed_s']} s.")
    return "\n".join(lines) + "\n"


def _f(x, nd: int = 1) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


if __name__ == "__main__":
    sys.exit(main())
