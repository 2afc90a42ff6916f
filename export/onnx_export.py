"""Export a model's components to ONNX (fp32, and fp16 converted from it), check each against torch, and
write the manifest last. `export_onnx` is what `nitrofusion export --format onnx` and the export cache run."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from nitrofusion.artifacts.manifest import ComponentEntry, Manifest, sha256_file
from nitrofusion.errors import NitroError
from nitrofusion.models import LoadedModel, load_model
from nitrofusion.sources import ModelSource, resolve_model, resolve_unet

from .components import ComponentSpec, component_specs
from .verify import verify
from .versions import OPSET, exporter_versions

PRECISIONS = ("fp32", "fp16")
_FP16_EXTERNAL = 3 << 29  # 1.5 GiB: keep well below protobuf's 2 GiB limit for one file


class ExportError(NitroError):
    """The export could not be written."""


def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _io_shapes(spec: ComponentSpec) -> tuple[dict, dict]:
    sample = spec.samples[0]
    inputs = {}
    for i, (n, x) in enumerate(zip(spec.input_names, sample)):
        axes = spec.dynamic_axes.get(n, {})
        inputs[n] = {"shape": [axes.get(d, s) for d, s in enumerate(x.shape)], "dtype": _dtype_name(x)}
    with torch.inference_mode():
        out = spec.module(*sample)
    out = out if isinstance(out, tuple) else (out,)
    outputs = {}
    for n, y in zip(spec.output_names, out):
        axes = spec.dynamic_axes.get(n, {})
        outputs[n] = {"shape": [axes.get(d, s) for d, s in enumerate(y.shape)], "dtype": "float32"}
    return inputs, outputs


def _export_fp32(spec: ComponentSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # Tracer warnings about Python branches on shapes are expected (diffusers' size checks).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module, spec.samples[0], str(path), input_names=spec.input_names, output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes, opset_version=OPSET, dynamo=False, do_constant_folding=True,
        )


def _convert_fp16(src: Path, dst: Path) -> None:
    """fp32 graph -> fp16 weights and compute, fp32 inputs and outputs (casts at the edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    big = sum(t.ByteSize() for t in model.graph.initializer) // 2 > _FP16_EXTERNAL
    # ONNX shape inference cannot take in-memory models over 2 GiB; the converter copes without it.
    model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=big)
    dst.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model16, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
              location=dst.name + ".data")


def save_model_files(model: LoadedModel, out: Path) -> None:
    """Configs and tokenizers the backends need, in the diffusers layout (no weights, no model_index.json,
    so an export folder is never mistaken for a diffusers folder)."""
    model.unet.save_config(out / "unet")
    model.vae.save_config(out / "vae")
    if model.preview_vae is not None:
        model.preview_vae.save_config(out / "vae_preview")
    for i, (tok, enc) in enumerate(zip(model.tokenizers, model.text_encoders)):
        suffix = "" if i == 0 else f"_{i + 1}"
        tok.save_pretrained(out / f"tokenizer{suffix}")
        (out / f"text_encoder{suffix}").mkdir(exist_ok=True)
        enc.config.to_json_file(out / f"text_encoder{suffix}" / "config.json")
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))


def _entry(root: Path, folder: Path, precision: str, spec: ComponentSpec, diff: float, allowed: float,
           shapes: tuple[dict, dict]) -> ComponentEntry:
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    return ComponentEntry(folder.relative_to(root).as_posix(), precision, shapes[0], shapes[1], files, diff,
                          allowed)


def export_onnx(model_dir: str | Path | ModelSource, out_dir: str | Path,
                unet_file: str | Path | ModelSource | None = None,
                precisions: tuple[str, ...] = PRECISIONS, tolerances: dict[str, float] | None = None,
                progress: bool = True, model: LoadedModel | None = None, cache_key: str | None = None,
                source_hash: str | None = None) -> Manifest:
    """Export every component for each precision into out_dir/<precision>/<component>/model.onnx."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise ExportError(f"unsupported ONNX precision {bad[0] if bad else ''!r}: use fp32 and/or fp16")
    source = resolve_model(model_dir)  # a folder, a cached hub repo id or a single-file checkpoint
    unet = resolve_unet(unet_file) if unet_file is not None else None
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"output folder {out} exists and is not empty: pick a new --out folder")
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(source, unet_file=unet)
    # Snapshot the source before the slow part; the hash names what this export was made from, and the name,
    # path and revision say how it was given (/v1/models and the logs show the name).
    recorded = {
        "path": str(source.path.resolve()),
        "hash": source_hash or source.content_hash(sha256_file),
        "unet_file": None if unet is None else str(unet.path.resolve()),
        "unet_hash": None if unet is None else sha256_file(unet.path),
        **{k: v for k, v in source.describe().items() if k != "path"},
    }
    if unet is not None:
        recorded["unet_given"] = unet.given
    specs = component_specs(model)
    tolerances = tolerances or {}
    components: dict[str, dict[str, ComponentEntry]] = {p: {} for p in precisions}
    todo = [(p, s) for p in ("fp32", "fp16") if p in precisions for s in specs]
    fp32_tmp = out / ".fp32-for-fp16"  # fp16 is converted from fp32; kept only when fp32 is asked for
    bar = tqdm(todo, desc="export", unit="graph", disable=not progress, leave=False)
    for precision, spec in bar:
        bar.set_postfix_str(f"{spec.name} {precision}")
        shapes = _io_shapes(spec)
        fp32_dir = (out if "fp32" in precisions else fp32_tmp) / "fp32" / spec.name
        folder = out / precision / spec.name
        if not (fp32_dir / "model.onnx").is_file():
            _export_fp32(spec, fp32_dir / "model.onnx")
        if precision == "fp16":
            if spec.fp16_ok:
                _convert_fp16(fp32_dir / "model.onnx", folder / "model.onnx")
            else:
                shutil.copytree(fp32_dir, folder)
        check_precision = precision if (precision == "fp32" or spec.fp16_ok) else "fp32"
        diff, allowed = verify(spec.name, check_precision, folder / "model.onnx", spec.module, spec.input_names,
                               spec.samples, tolerances.get(check_precision))
        entry = _entry(out, folder, check_precision, spec, diff, allowed, shapes)
        components[precision][spec.name] = entry
        if progress:
            tqdm.write(f"  {spec.name:<16} {precision}: max |onnx - torch| {diff:.2e} (allowed {allowed:.2e})")
    shutil.rmtree(fp32_tmp, ignore_errors=True)
    save_model_files(model, out)
    manifest = Manifest(
        family=model.family, source=recorded, exporter=exporter_versions(), opset=OPSET,
        precisions=list(precisions), components=components, latent_channels=int(model.unet.config.in_channels),
        vae_scale_factor=model.vae_scale_factor, native_size=model.native_size, cache_key=cache_key,
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    manifest.write(out)
    return manifest
