"""bench/vae_decoder.py's CPU smoke run: the options that run on the CPU decode the reference image, the GPU-only
ones say why they did not apply, and the JSON / markdown carry every case."""

import json

from .helpers import load_script

CASES = ["kernels+graph", "eager", "channels_last", "kernels+cl+cudnn+subpixel+fp16+graph", "tiny",
         "compile+cl+cudnn+subpixel+graph"]


def test_tiny_run_measures_and_compares_every_case(tmp_path):
    bench = load_script("bench/vae_decoder.py")
    out_json, out_md = tmp_path / "vae.json", tmp_path / "vae.md"
    assert bench.main(["--tiny", "--cases", ",".join(CASES), "--budget-s", "120", "--sizes", "32",
                       "--compile-shapes", "32:1",
                       "--json", str(out_json), "--markdown", str(out_md)]) == 0
    data = json.loads(out_json.read_text())
    assert data["meta"]["complete"] and data["meta"]["tiny"]
    rows = {(r["case"], r["batch"]): r for r in data["results"]}
    assert {c for c, _ in rows} == set(CASES)
    ref = rows[("kernels+graph", 1)]
    assert "ms" in ref and "saturated" in ref and set(ref["skipped"]) == {"kernels", "graph"}
    for case in ("eager", "channels_last", "kernels+cl+cudnn+subpixel+fp16+graph"):
        for batch in (1, 2):
            r = rows[(case, batch)]
            assert r["ms"] > 0 and r["ref"] == "kernels+graph" and r["max_diff"] <= 2, r
    assert {"fp16", "cudnn_benchmark"} <= set(rows[("kernels+cl+cudnn+subpixel+fp16+graph", 1)]["skipped"])
    assert rows[("tiny", 1)]["diff"] == "another decoder"
    compiled = rows[("compile+cl+cudnn+subpixel+graph", 1)]
    assert compiled["max_diff"] <= 2 and compiled["first_call_s"] > 0 and compiled["recompile_from_cache_s"] > 0
    assert "compile shapes" in rows[("compile+cl+cudnn+subpixel+graph", 2)]["skip"], "static shapes: one compiled"
    table = out_md.read_text()
    assert all(f"| {c} |" in table for c in CASES) and "tiny CPU smoke run" in table
