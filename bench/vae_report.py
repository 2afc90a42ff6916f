"""bench/vae_decoder.py's report: versions and the markdown table (one row per case, one column per shape)."""

from __future__ import annotations

import platform
import sys

import torch


def versions() -> dict:
    import diffusers

    triton = sys.modules.get("triton")  # kernels/ imported it where it is installed
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
            "triton": getattr(triton, "__version__", None), "python": platform.python_version()}


def markdown(meta: dict, results: list[dict], shapes) -> str:
    """One row per case: ms per shape, worst difference from today's default over the shapes, compile time."""
    v = meta["versions"]
    head = [f"{s}^2 b{b} ms" for s, b in shapes]
    tiny = " (tiny CPU smoke run)" if meta["tiny"] else ""
    partial = "" if meta["complete"] else " (PARTIAL: stopped early)"
    lines = [f"### VAE decoder options: {meta['card']}, {meta['date']}{tiny}{partial}", "",
             (f"`{meta['command']}` - torch {v['torch']} (CUDA {v['cuda']}), diffusers {v['diffusers']}, triton "
             f"{v['triton']}; {'tiny' if meta['tiny'] else 'SDXL'} VAE decoder, random weights, {meta['dtype']}; "
             "decoder + uint8 postprocess on the device, median of timed calls after warm-up (CUDA events). "
             "Difference: against the reference row (the first case that ran: today's default `kernels+graph` on "
             "a GPU, plain fp32 on the CPU) on the same fixed-seed latents, max over the shapes. "
              f"Whole run {meta['elapsed_s']} s (budget {meta['budget_s']:.0f} s)."), "",
             "| case | " + " | ".join(head) + " | max diff (uint8) | px differ | first call s | peak GiB | note |",
             "|---|" + "---|" * (len(head) + 5)]
    by_case: dict[str, list[dict]] = {}
    for r in results:
        by_case.setdefault(r["case"], []).append(r)
    for name, rows in by_case.items():
        ms = {(r["size"], r["batch"]): r for r in rows}
        cells = [f"{ms[s].get('ms', 0):.2f}" if "ms" in ms.get(s, {}) else "-" for s in shapes]
        done = [r for r in rows if "ms" in r]
        diffs = [r["max_diff"] for r in done if "max_diff" in r]
        pxs = [r["px_differ"] for r in done if "px_differ" in r]
        notes = sorted({r["skip"] for r in rows if "skip" in r})
        notes += sorted({f"GRAPH CAPTURE FAILED, ran eagerly: {r['graph_failed']}" for r in rows if "graph_failed" in r})
        if any("saturated" in r for r in done):
            notes.append("reference; saturated " + ", ".join(f"{100 * r['saturated']:.1f}%" for r in done
                                                               if "saturated" in r))
        if done and done[0].get("diff"):
            notes.append(done[0]["diff"])
        notes += [f"recompile from cache {r['recompile_from_cache_s']} s" for r in rows if "recompile_from_cache_s" in r]
        notes += [f"fp16 fallback rows {r['fp16_fallback_rows']}" for r in done[-1:] if "fp16_fallback_rows" in r]
        if rows[0]["skipped"]:
            notes.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in rows[0]["skipped"].items()))
        first = max((r["first_call_s"] for r in done), default=None)
        peak = max((r["peak_gib"] for r in done if r.get("peak_gib") is not None), default=None)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {max(diffs) if diffs else '-'} | "
                     f"{f'{100 * max(pxs):.3f}%' if pxs else '-'} | {first if first is not None else '-'} | "
                     f"{f'{peak:.2f}' if peak is not None else '-'} | {'; '.join(notes)} |")
    return "\n".join(lines) + "\n"
