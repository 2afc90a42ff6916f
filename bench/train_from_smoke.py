"""`nitrofusion train --from MODEL --smoke` at SDXL size, with no download: what a GPU check before a long run costs.

Builds the SDXL architecture with random weights (bench/gpu_pipeline.py's public configs; the tokenizers are
nitrofusion.tiny's byte-level BPE, since CLIP's vocabulary files cannot be fetched here), saved in fp16 as a
diffusers folder, then runs each stage of `nitrofusion train --from FOLDER --prompts FILE --smoke` through the CLI
in this process: cache (4 teacher pairs, DPM-Solver++ 25 steps, guidance 5), init (2 iterations of micro-batch 4,
accumulation 2), nitro (one iteration per bottom-up phase, micro-batch 5, accumulation 2; 480 heads), export; then
one 1-step image from the exported folder through `nitrofusion.pipeline.load_pipeline`. Per stage: wall seconds
(model loading included) and peak GPU memory, the figure that says which card a full run needs at these
micro-batches (the pretrained recipe's; weights fp32 + AdamW, frozen networks bf16, gradient checkpointing).

    python bench/train_from_smoke.py --json /tmp/train_from.json --markdown BENCHMARKS.md   # one GPU, ~4 minutes
    python bench/train_from_smoke.py --tiny                    # the same path on tiny SDXL models, CPU, seconds
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repository and bench/ (gpu_pipeline)

PROMPTS = ["a photo of a red cat on a sofa", "a blue square", "a green dog in the snow", "the cat, photo"]
STAGES = ["cache", "init", "nitro", "export"]


def log(msg: str) -> None:
    print(f"[train_from_smoke] {msg}", flush=True)


def save_random_sdxl(path: Path, tiny: bool) -> Path:
    from diffusers import StableDiffusionXLPipeline
    from gpu_pipeline import build_components

    from nitrofusion.tiny import tiny_scheduler

    cuda = not tiny and torch.cuda.is_available()
    unet, vae, (te1, te2), (tok1, tok2), _ = build_components(tiny, "cuda" if cuda else "cpu", seed=0)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=tiny_scheduler(), force_zeros_for_empty_prompt=True)
    if not tiny:
        pipe.to(torch.float16)  # as SDXL base is published; the trainer loads it back in fp32
    pipe.save_pretrained(path)
    return path


def measure(argv: list[str]) -> dict:
    from cli.main import main as cli_main

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rc = cli_main(argv)
    row = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    if cuda:
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="nitrofusion.tiny's SDXL on the CPU")
    p.add_argument("--size", type=int, default=0, help="training side (default: the model's native, 1024)")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, metavar="PATH")
    p.add_argument("--markdown", default=None, metavar="PATH", help="append a section (e.g. BENCHMARKS.md)")
    p.add_argument("--lean-disk", action="store_true",
                   help="one checkpoint per stage (at its end), sized and then deleted once the stage is done: what "
                        "fits a 64 GiB disk, where an SDXL student's checkpoint with AdamW state is ~31 GB and twice "
                        "that while a new one replaces the old; stage 3 writes none (optim.checkpoint_final=false)")
    args = p.parse_args(argv)
    root = Path(args.dir or tempfile.mkdtemp(prefix="train_from_"))
    t0 = time.perf_counter()
    model = save_random_sdxl(root / "model", args.tiny)
    log(f"random SDXL folder in {time.perf_counter() - t0:.0f} s")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    base = ["train", "--from", str(model), "--prompts", str(prompts), "--work", str(root / "work"),
            "--out", str(root / "student"), "--smoke"] + (["--set", f"data.image_size={args.size}"] if args.size else [])
    if args.lean_disk:
        # init: its final checkpoint only (sized, then deleted); nitro: none, since the model folder, init's
        # student, the phase-1 snapshot and nitro's output (7 + 3 x 10 GB) plus its ~36 GB checkpoint pass 64 GiB.
        base += ["--set", "init.optim.checkpoint_every=1000000", "--set", "nitro.optim.checkpoint_every=1000000",
                 "--set", "nitro.optim.checkpoint_final=false"]
    rows = {}
    for stage in STAGES:
        rows[stage] = measure([*base, "--stage", stage])
        checkpoint = root / "work" / stage / "checkpoint"
        if checkpoint.is_dir():
            rows[stage]["checkpoint_gb"] = round(sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
                                                 / 1e9, 1)
            if args.lean_disk and rows[stage]["rc"] == 0:
                shutil.rmtree(checkpoint)
        rows[stage]["disk_free_gb"] = round(shutil.disk_usage(root).free / 1e9, 1)
        log(f"{stage}: {rows[stage]}")
        if args.json:  # as it goes: a run cut short by a time limit still reports its finished stages
            Path(args.json).write_text(json.dumps(rows) + "\n")
        if rows[stage]["rc"] != 0:
            break
    else:
        from nitrofusion.generation import GenerationRequest
        from nitrofusion.pipeline import load_pipeline

        t0 = time.perf_counter()
        pipe = load_pipeline(root / "student", backend="torch", device="cuda" if torch.cuda.is_available() else "cpu")
        side = pipe.model.native_size
        image = pipe([GenerationRequest("a red cat", 1, 0, side, side)])[0]
        rows["generate"] = {"rc": 0, "seconds": round(time.perf_counter() - t0, 1), "shape": list(image.shape)}
        log(f"generate: {rows['generate']}")
    cfg = json.loads((root / "work" / "cache" / "train_config.json").read_text()) \
        if (root / "work" / "cache" / "train_config.json").is_file() else {}
    result = {"date": dt.date.today().isoformat(), "host": platform.node(),
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "image_size": cfg.get("data", {}).get("image_size"), "stages": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        lines = [f"\n## `nitrofusion train --from` smoke at SDXL size ({result['gpu']}, {result['date']})\n",
                 ("`python bench/train_from_smoke.py`: random-weight SDXL, `--smoke` (micro-batches of the pretrained "
                 f"recipe: init 4, nitro 5; accumulation 2), {result['image_size']}^2.\n"),
                 "| stage | exit | wall s | peak GiB | checkpoint GB | disk free after, GB |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {v['rc']} | {v['seconds']} | {v.get('peak_gib', '-')} | {v.get('checkpoint_gb', '-')} | "
                  f"{v.get('disk_free_gb', '-')} |" for k, v in rows.items()]
        with open(args.markdown, "a") as f:
            f.write("\n".join(lines) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
