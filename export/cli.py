"""`nitrofusion export --model MODEL --format onnx|tensorrt --out DIR`: the command behind the CLI subcommand."""

from __future__ import annotations

import argparse
from pathlib import Path

from nitrofusion.errors import InvalidRequest

PRECISIONS = ("fp32", "fp16")  # as export.onnx_export.PRECISIONS, without importing torch for a bad flag


def _list(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip()) if text else default


def run_export(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidRequest("out", f"{out} exists and is not an empty folder: pick a new folder")
    if args.format == "onnx":
        from nitrofusion.sources import resolve_model

        from .onnx_export import export_onnx

        precisions = _list(args.precision, PRECISIONS)
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad:
            raise InvalidRequest("precision", f"{bad[0]!r} is not an ONNX precision: use fp32 and/or fp16")
        source = resolve_model(args.model, getattr(args, "config", None))  # a folder, hub id or single file
        manifest = export_onnx(source, out, unet_file=args.unet, precisions=precisions)
        print(f"wrote ONNX export of {manifest.family} model to {out} ({', '.join(precisions)}, opset "
              f"{manifest.opset}); use it as --model {out}")
        return 0
    if args.format == "tensorrt":
        from nitrofusion.artifacts.engines import require_tensorrt
        from nitrofusion.sources import resolve_model

        from .onnx_export import export_onnx
        from .tensorrt_build import build_engines
        from .tensorrt_plan import PRECISION_FLAGS, parse_sizes

        precision = args.precision or "fp16"
        if precision not in PRECISION_FLAGS:
            raise InvalidRequest("precision", f"{precision!r} is not a TensorRT precision: use one of "
                                 f"{', '.join(PRECISION_FLAGS)}")
        sizes = parse_sizes(args.sizes) if args.sizes else None
        try:
            buckets = [int(b) for b in _list(args.buckets, ())] or None
        except ValueError:
            raise InvalidRequest("buckets", f"{args.buckets!r} is not a comma-separated list of batch sizes") from None
        require_tensorrt()  # before the slow ONNX export
        if buckets is None:
            from nitrofusion.scheduler import DEFAULT_BUCKETS

            buckets = list(DEFAULT_BUCKETS)
        export_onnx(resolve_model(args.model, getattr(args, "config", None)), out / "onnx", unet_file=args.unet,
                    precisions=("fp32",))
        engines = build_engines(out / "onnx", out, buckets, sizes, precision)
        print(f"wrote {len(engines.engines)} TensorRT engines ({precision}, buckets "
              f"{','.join(map(str, buckets))}) to {out}; use it as --model {out} --backend tensorrt")
        return 0
    raise InvalidRequest("format", f"{args.format!r} is not an export format: use onnx or tensorrt")
