"""ONNX export: the manifest says what was exported from what; each graph is checked against torch and a
bad one fails loudly; the export cache is reused, and rebuilt when corrupted; the CLI's export folder works
as --model."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from export import cache as export_cache
from export import onnx_export
from export.builder import ExportBuilder
from export.verify import verify
from nitrofusion.artifacts.manifest import MANIFEST_NAME, check_files, hash_folder, read_manifest
from nitrofusion.errors import ExportVerificationError, NitroError
from nitrofusion.generation import GenerationRequest
from nitrofusion.pipeline import load_pipeline

from .helpers import run_cli


def test_manifest_contents(onnx_exports, tiny_dirs):
    root = onnx_exports["sdxl"]
    m = read_manifest(root)
    raw = json.loads((root / MANIFEST_NAME).read_text())
    assert raw["format"] == "nitrofusion-onnx" and raw["format_version"] == 1
    assert m.family == "sdxl" and m.opset == 17 and m.precisions == ["fp32", "fp16"]
    assert m.source["hash"] == hash_folder(tiny_dirs["sdxl"]) and m.source["unet_file"] is None
    for pkg in ("torch", "onnx", "onnxruntime", "diffusers", "transformers", "nitrofusion", "exporter"):
        assert m.exporter[pkg]
    assert (m.latent_channels, m.vae_scale_factor, m.native_size) == (4, 2, 32)
    assert set(m.components["fp32"]) == set(m.components["fp16"]) == {"text_encoder", "text_encoder_2", "unet",
                                                                        "vae_decoder"}
    unet = m.components["fp32"]["unet"]
    assert unet.inputs["latents"] == {"shape": ["B", 4, "h", "w"], "dtype": "float32"}
    assert unet.inputs["timesteps"] == {"shape": ["B"], "dtype": "int64"}  # one timestep per row
    assert unet.inputs["embeds"]["shape"] == ["B", 77, 64] and unet.inputs["pooled"]["shape"] == ["B", 32]
    assert unet.inputs["time_ids"]["shape"] == ["B", 6] and unet.outputs["eps"]["shape"] == ["B", 4, "h", "w"]
    assert m.components["fp32"]["text_encoder_2"].outputs.keys() == {"hidden", "pooled"}
    assert m.components["fp16"]["unet"].precision == "fp16"
    assert m.components["fp16"]["vae_decoder"].precision == "fp32"  # the SDXL VAE overflows in fp16
    for comps in m.components.values():
        for entry in comps.values():
            assert 0 <= entry.max_abs_diff <= entry.tolerance  # checked against torch at export time
    assert m.components["fp16"]["unet"].max_abs_diff > m.components["fp32"]["unet"].max_abs_diff
    assert check_files(root, m) is None
    # What the backends need besides the graphs; never model_index.json (not a diffusers folder).
    for f in ("unet/config.json", "vae/config.json", "tokenizer/tokenizer_config.json",
              "tokenizer_2/tokenizer_config.json", "scheduler/scheduler_config.json", "text_encoder_2/config.json"):
        assert (root / f).is_file(), f
    assert not (root / "model_index.json").exists()
    assert not any(root.glob("**/*.safetensors"))


def test_graphs_have_a_dynamic_batch_axis(onnx_exports):
    import onnxruntime as ort

    entry = read_manifest(onnx_exports["sd"]).components["fp32"]["text_encoder"]
    sess = ort.InferenceSession(str(onnx_exports["sd"] / entry.folder / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        (hidden,) = sess.run(None, {"input_ids": np.zeros((batch, 77), dtype=np.int64)})
        assert hidden.shape == (batch, 77, 32)


def test_verification_fails_loudly_past_the_tolerance(onnx_exports, pipelines):
    """A graph checked against a torch module it does not match is refused with the difference named."""
    root = onnx_exports["sd"]
    entry = read_manifest(root).components["fp32"]["vae_decoder"]
    from export.components import DecoderGraph

    vae = pipelines["sd"].model.vae
    samples = [(torch.randn(1, 4, 8, 8),)]
    diff, _ = verify("vae_decoder", "fp32", root / entry.folder / "model.onnx", DecoderGraph(vae), ["latents"],
                     samples)
    assert diff < 1e-3
    wrong = DecoderGraph(vae)
    original = vae.decoder.conv_out.bias.detach().clone()
    try:
        with torch.no_grad():
            vae.decoder.conv_out.bias.add_(0.5)
        with pytest.raises(ExportVerificationError, match=r"exported vae_decoder \(fp32\) differs from torch by"):
            verify("vae_decoder", "fp32", root / entry.folder / "model.onnx", wrong, ["latents"], samples)
    finally:
        with torch.no_grad():
            vae.decoder.conv_out.bias.copy_(original)


def test_export_refuses_a_non_empty_out_folder(tiny_dirs, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(NitroError, match="not empty"):
        onnx_export.export_onnx(tiny_dirs["sd"], tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cache_key_changes_with_content_unet_and_versions():
    base = {"source_hash": "a" * 64, "unet_hash": None, "precisions": ("fp32",), "versions": {"torch": "2.13.0"}}
    key = export_cache.onnx_cache_key(**base)
    assert key == export_cache.onnx_cache_key(**base)
    for change in ({"source_hash": "b" * 64}, {"unet_hash": "c" * 64}, {"precisions": ("fp32", "fp16")},
                   {"versions": {"torch": "2.14.0"}}):
        assert export_cache.onnx_cache_key(**(base | change)) != key, change


def test_cache_reused_then_rebuilt_when_corrupted(pipelines, tmp_path, monkeypatch):
    """`--backend onnxruntime` on a diffusers folder exports once into the cache; the second load reuses the
    entry (no export call, files untouched); a corrupted graph file or a stale manifest is not used. The model
    has a tiny preview decoder, which is exported and used for previews."""
    from nitrofusion.tiny import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "sd", seed=0, preview=True)  # the tiny SD + vae_preview/
    monkeypatch.setenv("NITRO_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: calls.append(a[0]) or real(*a, **k))

    req = GenerationRequest("a red cat", 2, seed=5, width=32, height=32)
    first = load_pipeline(model_dir, device="cpu", backend="onnxruntime", builder=ExportBuilder())
    assert len(calls) == 1 and first.backend.name == "onnxruntime"
    entry = first.backend.root
    assert entry.parent == tmp_path / "cache" / "onnx"
    unet_file = entry / read_manifest(entry).components["fp32"]["unet"].folder / "model.onnx"
    stamps = {p: p.stat().st_mtime_ns for p in entry.rglob("*") if p.is_file()}

    second = load_pipeline(model_dir, device="cpu", backend="onnxruntime", builder=ExportBuilder())
    assert len(calls) == 1 and second.backend.root == entry
    assert {p: p.stat().st_mtime_ns for p in entry.rglob("*") if p.is_file()} == stamps
    image = second([req])[0]
    assert np.abs(image.astype(int) - pipelines["sd"]([req])[0].astype(int)).max() <= 2
    assert "vae_preview" in read_manifest(entry).components["fp32"]
    from diffusers import AutoencoderTiny

    from nitrofusion.backends.torch_backend import to_uint8

    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref_preview = to_uint8(AutoencoderTiny.from_pretrained(model_dir / "vae_preview").decode(latents)[0])
    assert np.abs(second.backend.preview(latents).astype(int) - ref_preview.astype(int)).max() <= 2

    # Corrupt the UNet graph: detected by its recorded hash, rebuilt, and the rebuilt entry is whole again.
    unet_file.write_bytes(unet_file.read_bytes()[:1000])
    third = load_pipeline(model_dir, device="cpu", backend="onnxruntime", builder=ExportBuilder())
    assert len(calls) == 2 and third.backend.root == entry
    assert check_files(entry, read_manifest(entry)) is None
    assert np.array_equal(third([req])[0], image)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind

    # A stale entry (made for another key: other exporter versions or source) is never used.
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    manifest["cache_key"] = "0" * 64
    (entry / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "another model" in export_cache._entry_problem(entry, read_manifest(entry).cache_key.replace("0", "1"))
    os.remove(entry / MANIFEST_NAME)
    assert "no manifest" in export_cache._entry_problem(entry, "x")


def test_source_change_gives_a_new_cache_entry(tiny_dirs, tmp_path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_dirs["sd"], copy)
    before = hash_folder(copy)
    sched = copy / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text() + " ")  # any byte of the model's content
    assert hash_folder(copy) != before
    os.utime(sched, (0, 0))  # mtimes are not content
    (copy / "scheduler" / "scheduler_config.json").write_text((tiny_dirs["sd"] / "scheduler" /
                                                               "scheduler_config.json").read_text())
    assert hash_folder(copy) == before


@pytest.mark.slow  # two real CLI processes and a full export (~20 s)
def test_cli_export_folder_works_as_model(tiny_dirs, pipelines, tmp_path):
    out = tmp_path / "exported"
    r = run_cli("export", "--model", tiny_dirs["sd"], "--format", "onnx", "--out", out, "--precision", "fp32",
                timeout=300)
    assert r.returncode == 0, r.stderr
    assert "use it as --model" in r.stdout and (out / MANIFEST_NAME).is_file()
    assert "max |onnx - torch|" in r.stdout  # the check against torch is reported while exporting

    png = tmp_path / "cat.png"
    r = run_cli("generate", "--model", out, "--prompt", "a red cat", "--steps", "4", "--seed", "11",
                "--width", "48", "--height", "32", "--out", png)
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(png).convert("RGB"))
    ref = pipelines["sd"]([GenerationRequest("a red cat", 4, seed=11, width=48, height=32)])[0]
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 2

    for args, needle in (
        (("generate", "--model", out, "--backend", "torch", "--prompt", "x", "--out", png), "--backend onnxruntime"),
        (("export", "--model", tiny_dirs["sd"], "--format", "onnx", "--out", out), "not an empty folder"),
        (("export", "--model", tiny_dirs["sd"], "--format", "pdf", "--out", tmp_path / "x"), "--format"),
        (("generate", "--model", tiny_dirs["sd"], "--backend", "nope", "--prompt", "x", "--out", png),
         "unknown backend"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_hash_memo_skips_unchanged_files_and_rehashes_changed_ones(tiny_dirs, tmp_path, monkeypatch):
    import shutil

    from export import hash_memo
    from export.hash_memo import HashMemo

    copy = tmp_path / "model"
    shutil.copytree(tiny_dirs["sd"], copy)
    reads: list[str] = []
    real = hash_memo.sha256_file
    monkeypatch.setattr(hash_memo, "sha256_file", lambda p: reads.append(p.name) or real(p))
    memo_file = tmp_path / "cache" / "file-hashes.json"

    memo = HashMemo(memo_file)
    first = hash_folder(copy, memo.digest)
    assert first == hash_folder(copy), "the memo must not change the content hash"
    n_files = len(reads)
    assert n_files > 3
    memo.save()

    reads.clear()
    memo = HashMemo(memo_file)  # a new process: the memo comes from disk
    assert hash_folder(copy, memo.digest) == first and reads == [], "unchanged files are not read again"

    sched = copy / "scheduler" / "scheduler_config.json"
    sched.write_text(sched.read_text() + " ")
    changed = hash_folder(copy, memo.digest)
    assert reads == ["scheduler_config.json"] and changed == hash_folder(copy) != first

    monkeypatch.setenv("NITRO_REHASH", "1")  # the escape hatch reads everything
    reads.clear()
    assert hash_folder(copy, HashMemo(memo_file).digest) == changed and len(reads) == n_files

    memo_file.write_text("{not json")  # a damaged memo only costs the hashing
    monkeypatch.delenv("NITRO_REHASH")
    assert hash_folder(copy, HashMemo(memo_file).digest) == changed
