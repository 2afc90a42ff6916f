"""`nitrofusion` command line: generate, serve. Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from .errors import InvalidRequest, NitroError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="diffusers model folder (default: the bundled model)")
    p.add_argument("--unet", metavar="FILE", help="UNet state dict (.safetensors) to swap in, e.g. NitroSD-Realism")
    p.add_argument("--shift", type=int, default=None,
                   help="timestep shift S when the model folder sets none (default 250; Vibrant uses 500)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: fp32 on CPU, fp16 on CUDA)")


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

    serve = sub.add_parser("serve", help="serve the HTTP API")
    _model_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--log-level", default="info")
    return parser


def _out_format(path: Path) -> str:
    fmt = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(path.suffix.lower())
    if fmt is None:
        raise InvalidRequest("out", f"unsupported image type {path.suffix!r}: use .png, .jpg or .webp")
    if not path.parent.exists():
        raise InvalidRequest("out", f"folder {path.parent} does not exist")
    return fmt


def cmd_generate(args: argparse.Namespace) -> int:
    from .generation import GenerationRequest
    from .images import encode_image
    from .limits import check_seed, check_steps
    from .pipeline import load_pipeline

    out = Path(args.out)
    fmt = _out_format(out)
    check_steps(args.steps)  # the checks that need no model run before the (slow) model load
    if args.seed is not None:
        check_seed(args.seed)
    pipe = load_pipeline(args.model, args.unet, args.shift, args.device, args.dtype)
    seed = secrets.randbits(63) if args.seed is None else args.seed
    native = pipe.model.native_size
    req = GenerationRequest(args.prompt, args.steps, seed, args.width or native, args.height or native)
    image = pipe([req])[0]
    out.write_bytes(encode_image(image, fmt))
    print(f"wrote {out} ({req.width}x{req.height}, {req.steps} step{'s' * (req.steps > 1)}, seed {seed})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import run_server

    run_server(model=args.model, unet=args.unet, shift=args.shift, device=args.device, dtype=args.dtype,
               host=args.host, port=args.port, log_level=args.log_level)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"generate": cmd_generate, "serve": cmd_serve}[args.command](args)
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
