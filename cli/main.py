"""`nitrofusion` command line: generate, export, serve. Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from nitrofusion.errors import InvalidRequest, NitroError

MODEL_HELP = ("a local diffusers folder; or ORG/NAME[@REVISION], a repo already in the Hugging Face cache (read "
              "offline); or a single-file .safetensors checkpoint (SD1.x / SDXL original layout, e.g. NitroSD's "
              "*_comfyui.safetensors), local or ORG/NAME/FILE.safetensors from the cache")
UNET_HELP = ("UNet state dict (.safetensors) to swap in, a local file or ORG/NAME/FILE.safetensors from the Hugging "
             "Face cache, e.g. ChenDY/NitroFusion/nitrosd-realism_unet.safetensors")
CONFIG_HELP = ("single-file checkpoints: a diffusers folder or cached repo id whose configs and tokenizers describe "
               "it (default: the shipped SDXL-base or SD1.5 configs, picked from the checkpoint)")


def _source_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", metavar="MODEL", required=required,
                   help=MODEL_HELP + ("" if required else " (default: the bundled model)"))
    p.add_argument("--unet", metavar="FILE", help=UNET_HELP)
    p.add_argument("--config", metavar="DIR", default=None, help=CONFIG_HELP)


def _model_args(p: argparse.ArgumentParser) -> None:
    _source_args(p)
    p.add_argument("--shift", type=int, default=None,
                   help="timestep shift S when the model sets none (default 250: NitroSD-Realism; NitroSD-Vibrant "
                        "uses 500). Single-file checkpoints carry none: pass it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU, fp16 on CUDA)")
    p.add_argument("--backend", default=None,
                   help="torch, onnxruntime or tensorrt (default: onnxruntime on CPU, torch on CUDA; an export "
                        "folder picks its own). On CPU the first run exports the model to ONNX once, into "
                        "$NITRO_CACHE_DIR (default ~/.cache/nitrofusion); --backend torch skips that")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitrofusion", description="Real-time 1-4 step text-to-image.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate one image to a file")
    _model_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--steps", type=int, default=1, help="1-4 (default 1)")
    gen.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    gen.add_argument("--width", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--height", type=int, default=None, help="default: the model's native size")
    gen.add_argument("--out", required=True, metavar="FILE", help="output image (.png, .jpg or .webp)")
    gen.add_argument("--decoder", default="full", help="full (the model's VAE decoder, default) or fast (its tiny "
                     "decoder in vae_preview/: several times cheaper, a little softer)")

    exp = sub.add_parser("export", help="export a model to ONNX or TensorRT engines (usable as --model)")
    _source_args(exp, required=True)
    exp.add_argument("--format", required=True, help="onnx or tensorrt")
    exp.add_argument("--out", metavar="DIR", required=True, help="new folder for the export")
    exp.add_argument("--precision", default=None,
                     help="onnx: fp32,fp16 (default both); tensorrt: fp16 (default), bf16, fp8 or fp32")
    exp.add_argument("--buckets", default=None, help="tensorrt: batch sizes, one profile each (default: the engine's)")
    exp.add_argument("--sizes", default=None, help="tensorrt: WIDTHxHEIGHT list (default: the model's native size)")

    serve = sub.add_parser("serve", help="serve the HTTP API (flags override NITRO_* environment variables)")
    _model_args(serve)
    serve.add_argument("--host", default=None, help="default 127.0.0.1 (NITRO_HOST)")
    serve.add_argument("--port", type=int, default=None, help="default 8000 (NITRO_PORT)")
    serve.add_argument("--log-level", default=None, help="default info (NITRO_LOG_LEVEL)")
    serve.add_argument("--max-batch", type=int, default=None, help="rows per UNet call, default 16")
    serve.add_argument("--buckets", default=None, help="batch sizes to pad to, default 1,2,4,8,16")
    serve.add_argument("--max-queue", type=int, default=None, help="waiting requests before 429, default 256")
    serve.add_argument("--request-timeout", type=float, default=None, help="seconds before 504, default 120")
    serve.add_argument("--batch-wait-ms", type=float, default=None,
                       help="how long an idle engine waits to fill a batch, default 0")
    serve.add_argument("--warmup-sizes", default=None,
                       help="WIDTHxHEIGHT list whose CUDA graphs are captured before ready (default: native size)")
    serve.add_argument("--latency-target-ms", type=float, default=None,
                       help='what "steps": "auto" requests aim for, admission to image (default: off, auto = max '
                            "steps)")
    serve.add_argument("--no-batching", dest="batching", action="store_const", const=False, default=None,
                       help="one request at a time (for comparison)")
    serve.add_argument("--header-timeout", type=float, default=None,
                       help="seconds a client has to send a request's headers, default 10")
    serve.add_argument("--body-timeout", type=float, default=None,
                       help="seconds a client has to send a request's body (else 408), default 30")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="open connections, websockets included, before 503, default 1024")
    serve.add_argument("--max-header-bytes", type=int, default=None,
                       help="request line + headers before 431, default 16384")

    train = sub.add_parser("train", help="train a student (stages 0-3 + export; resumable)")
    from trainer.cli import add_arguments as _train_args  # argparse only: the trainer's heavy imports stay lazy

    _train_args(train)

    ev = sub.add_parser("eval", help="measure a trained shapes student: alignment, shapes-FID, ablations -> EVAL.md")
    from trainer.cli import add_eval_arguments as _eval_args

    _eval_args(ev)
    return parser


def _out_format(path: Path) -> str:
    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower())
    if fmt is None:
        raise InvalidRequest("out", f"unsupported image type {path.suffix!r}: use .png, .jpg or .webp")
    if not path.parent.exists():
        raise InvalidRequest("out", f"folder {path.parent} does not exist")
    return fmt


def cmd_generate(args: argparse.Namespace) -> int:
    from export.builder import ExportBuilder
    from nitrofusion.generation import GenerationRequest
    from nitrofusion.images import encode_image
    from nitrofusion.limits import check_decoder, check_seed, check_steps
    from nitrofusion.pipeline import load_pipeline

    out = Path(args.out)
    fmt = _out_format(out)
    check_steps(args.steps)  # the checks that need no model run before the (slow) model load
    check_decoder(args.decoder)
    if args.seed is not None:
        check_seed(args.seed)
    pipe = load_pipeline(args.model, args.unet, args.shift, args.device, args.dtype, backend=args.backend,
                         builder=ExportBuilder(), config=args.config)
    seed = secrets.randbits(63) if args.seed is None else args.seed
    native = pipe.model.native_size
    req = GenerationRequest(args.prompt, args.steps, seed, args.width or native, args.height or native,
                            decoder=args.decoder)
    image = pipe([req])[0]
    out.write_bytes(encode_image(image, fmt))
    print(f"wrote {out} ({req.width}x{req.height}, {req.steps} step{'s' * (req.steps > 1)}, seed {seed})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.cli import run_export

    return run_export(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from server.app import run_server
    from server.settings import ServerSettings

    flags = {k: v for k, v in vars(args).items() if k != "command" and v is not None}
    try:
        settings = ServerSettings(**flags)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "settings"
        raise InvalidRequest(field.replace("_", "-"), err["msg"]) from None
    run_server(settings)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "train":
            from trainer.cli import train_command  # lazy: torch/diffusers load only when training

            return train_command(args)
        if args.command == "eval":
            from trainer.cli import eval_command

            return eval_command(args)
        return {"generate": cmd_generate, "export": cmd_export, "serve": cmd_serve}[args.command](args)
    except InvalidRequest as e:
        print(f"nitrofusion {args.command}: error: --{e.field}: {e.reason}", file=sys.stderr)
        return 2
    except NitroError as e:
        print(f"nitrofusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
