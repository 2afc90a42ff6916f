"""Decoder-speed options for a diffusers AutoencoderKL (or AutoencoderTiny): one function, `prepare_decoder`,
turns a VAE into a `decode(z) -> image` callable with the chosen options applied, and `undo()` puts it back.

Options (DecoderOptions; the text form is what NITRO_VAE takes, comma-separated):
  kernels          the fused Triton GroupNorm(+SiLU) modules of kernels/patch.py (Accelerator's `kernels`
                   switch sets it; not part of NITRO_VAE)
  channels_last    weights and activations in NHWC: cuDNN's bf16/fp16 convolutions run NHWC natively (NCHW
                   pays transposes); our GroupNorm kernel reads either layout. Eager torch GroupNorm in NHWC
                   is slow (the anchors measured 142.9 vs 91.2 ms eager), so it pays only with `kernels` or
                   `compile`.
  cudnn_benchmark  torch.backends.cudnn.benchmark = True: cuDNN times its algorithms per shape on the first
                   call (process-wide: the UNet gets it too; the CUDA-graph warm-up runs pay for it).
  subpixel         nearest-2x upsample + 3x3 conv as one 2x2 conv (kernels/upsample.py): 2.25x fewer FLOPs
                   in the three upsample convs, no 4x-upsampled tensor in memory.
  compile[=MODE]   torch.compile of the decode path (post_quant_conv + decoder), static shapes (one compile per
                   batch bucket and size). MODE: default | max-autotune-no-cudagraphs | reduce-overhead |
                   max-autotune. Inside our own CUDA graphs (kernels/cuda_graphs.py) only the first two are
                   allowed: the other two capture CUDA graphs of their own, and graphs do not nest. The
                   compiled code is cached under $NITRO_CACHE_DIR/inductor (TORCHINDUCTOR_CACHE_DIR, unless
                   that is set already): inductor's FX graph and autotuning caches are on by default, so a
                   restart re-traces (seconds) but does not recompile.
  fp16             decode in fp16 with an overflow guard. The SDXL VAE's activations overflow fp16 (inf ->
                   NaN, black images: ../shared/docs/performance-anchors.md), and which layers overflow
                   depends on the weights, so no fixed set of layers can be upcast ahead of time. Chosen
                   instead: run the whole decoder in fp16 (a second, fp16 copy of its weights; ~100 MB for
                   SDXL), return a per-row "all finite" flag computed on the device (no host sync, so it
                   lives inside a CUDA graph), and re-decode the rows that came out non-finite with the
                   original bf16 decoder on the host side (PreparedDecoder.repair). Overflow always surfaces
                   at the output: inf turns into NaN in the next GroupNorm, and the convolutions spread it.
                   With stock SDXL VAE weights nearly every image would take the fallback (slower than bf16
                   alone); with fp16-safe weights (madebyollin/sdxl-vae-fp16-fix) none do. On Hopper, fp16 and
                   bf16 tensor-core rates are the same: fp16 is only worth it if the card measures it faster.

Options that need CUDA (cudnn_benchmark, fp16; kernels outside TRITON_INTERPRET=1) are skipped on the CPU
and listed in PreparedDecoder.skipped with the reason; everything else runs on the CPU as on the GPU.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn

from ._common import available, interpreting
from .patch import PatchHandle, patch_vae_decoder
from .upsample import swap_upsamplers

ENV = "NITRO_VAE"
# Today's path. The lead switches this after the H200 measurement (bench/vae_decoder.py, BENCHMARKS.md).
DEFAULT_VAE_MODE = ""
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
GRAPH_SAFE_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
_FLAGS = ("channels_last", "cudnn_benchmark", "subpixel", "fp16")


@dataclass(frozen=True)
class DecoderOptions:
    kernels: bool = False
    channels_last: bool = False
    cudnn_benchmark: bool = False
    subpixel: bool = False
    compile: str | None = None  # a COMPILE_MODES entry, or None for eager
    fp16: bool = False
    compile_backend: str = "inductor"  # tests and CPU smoke runs use "eager" (dynamo only)

    def __post_init__(self):
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")

    @classmethod
    def parse(cls, spec: str | None, **base) -> DecoderOptions:
        """'channels_last,subpixel,compile=max-autotune-no-cudagraphs' -> options. '' / 'default' / 'none':
        none of them. `base` sets the fields not in the text form (kernels, compile_backend)."""
        values: dict = dict(base)
        for token in (t.strip() for t in (spec or "").split(",")):
            if token in ("", "default", "none"):
                continue
            name, _, arg = token.partition("=")
            if name == "compile":
                values["compile"] = arg or "default"
            elif name in _FLAGS and not arg:
                values[name] = True
            else:
                raise ValueError(f"{ENV}: unknown option {token!r}; use a comma-separated list of "
                                 f"{', '.join(_FLAGS)}, compile or compile=MODE ({', '.join(COMPILE_MODES)})")
        return cls(**values)

    def spec(self) -> str:
        """The text form (kernels and compile_backend left out): parse(spec()) gives these options back."""
        parts = [f.name for f in fields(self) if f.name in _FLAGS and getattr(self, f.name)]
        if self.compile:
            parts.append("compile" if self.compile == "default" else f"compile={self.compile}")
        return ",".join(parts)


def options_from_env(mode: str | DecoderOptions | None = None, kernels: bool = False) -> DecoderOptions:
    """An explicit mode wins, else $NITRO_VAE, else DEFAULT_VAE_MODE; `kernels` comes from the caller."""
    if isinstance(mode, DecoderOptions):
        return replace(mode, kernels=kernels)
    if mode is None:
        mode = os.environ.get(ENV, DEFAULT_VAE_MODE)
    return DecoderOptions.parse(mode, kernels=kernels)


def compile_cache_dir() -> Path:
    """Point inductor's on-disk caches at $NITRO_CACHE_DIR/inductor, unless TORCHINDUCTOR_CACHE_DIR is set."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        # The same root as export/cache.py's cache_root() (not imported: kernels/ stays free of export/).
        root = os.environ.get("NITRO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
            / "nitrofusion"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(root).expanduser() / "inductor")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


class DecodePath(nn.Module):
    """What vae.decode(z) computes without tiling or slicing: post_quant_conv (AutoencoderKL) then the decoder.
    Shares the VAE's modules. With channels_last the input is made NHWC first (the output stays NHWC)."""

    def __init__(self, vae: nn.Module, channels_last: bool):
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder
        self.channels_last = channels_last

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _set_recompile_limit(n: int) -> None:
    """Static shapes compile once per (bucket, size): allow more of them than dynamo's default 8."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), n))


@dataclass
class PreparedDecoder:
    """decode(z) -> (B, 3, H, W) image in [-1, 1]. For fp16, `decode_flagged` is the graph-capturable half
    (image, per-row finite flag) and `repair` the host-side half; __call__ does both."""

    options: DecoderOptions
    fast: Callable[[torch.Tensor], torch.Tensor]
    safe: Callable[[torch.Tensor], torch.Tensor] | None = None  # the bf16 path behind the fp16 guard
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    handle: PatchHandle | None = None  # the fused-kernel patch, for patch counts
    fallback_rows: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list)

    @property
    def guarded(self) -> bool:
        return self.safe is not None

    def decode_flagged(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.fast(z.to(torch.float16) if self.guarded else z)
        return image, torch.isfinite(image).flatten(1).all(dim=1)

    def repair(self, z: torch.Tensor, out: torch.Tensor, ok: torch.Tensor,
               post: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Re-decode the rows whose flag is False with the safe path (post: the postprocess `out` went through,
        e.g. to uint8). One host sync on the (B,) flag; the caller copies the image to the host anyway."""
        bad = (~ok).nonzero().flatten()
        if bad.numel() == 0:
            return out
        self.fallback_rows += int(bad.numel())
        fixed = self.safe(z[bad])
        out = out.clone()
        out[bad] = post(fixed) if post is not None else fixed.to(out.dtype)
        return out

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if not self.guarded:
            return self.fast(z)
        image, ok = self.decode_flagged(z)
        return self.repair(z, image, ok)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.applied.clear()


def _to_channels_last(module: nn.Module, undo: list) -> None:
    module.to(memory_format=torch.channels_last)
    undo.append(lambda: module.to(memory_format=torch.contiguous_format))


def prepare_decoder(vae: nn.Module, options: DecoderOptions, graphs: bool = False) -> PreparedDecoder:
    """Apply `options` to vae (in place, on its current device and dtype) and return the decode callable.
    `graphs`: the caller will capture decode calls in its own CUDA graphs (compile modes that make graphs
    of their own are refused then)."""
    device = next(vae.parameters()).device
    cuda = device.type == "cuda"
    opts = options
    skipped: dict[str, str] = {}
    if opts.kernels and not (available() and (cuda or interpreting())):
        skipped["kernels"] = "the fused kernels need triton and a CUDA device (or TRITON_INTERPRET=1)"
        opts = replace(opts, kernels=False)
    if opts.cudnn_benchmark and not cuda:
        skipped["cudnn_benchmark"] = "cuDNN is CUDA-only"
        opts = replace(opts, cudnn_benchmark=False)
    if opts.fp16 and not cuda:
        skipped["fp16"] = "fp16 decode needs CUDA (the CPU path runs fp32)"
        opts = replace(opts, fp16=False)
    if graphs and opts.compile not in (None, *GRAPH_SAFE_COMPILE_MODES):
        raise ValueError(f"compile={opts.compile} makes CUDA graphs of its own and cannot run inside ours: use "
                         f"{' or '.join(GRAPH_SAFE_COMPILE_MODES)}, or turn CUDA graphs off")
    if not hasattr(vae, "decoder"):
        raise TypeError(f"{type(vae).__name__} has no decoder: expected a diffusers AutoencoderKL or AutoencoderTiny")

    prep = PreparedDecoder(options=opts, fast=None, skipped=skipped)  # type: ignore[arg-type]
    undo = prep._undo
    if opts.kernels:
        prep.handle = patch_vae_decoder(vae)
        undo.append(prep.handle.undo)
        prep.applied.append("kernels")
    path = DecodePath(vae, opts.channels_last)
    if opts.channels_last:
        _to_channels_last(path, undo)
        prep.applied.append("channels_last")
    if opts.cudnn_benchmark:
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True
        undo.append(lambda: setattr(torch.backends.cudnn, "benchmark", before))
        prep.applied.append("cudnn_benchmark")
    paths = [path]
    if opts.fp16:
        fast_path = copy.deepcopy(path).to(torch.float16)  # patched modules, NHWC weights and all
        paths = [fast_path, path]
        prep.applied.append("fp16")
    if opts.subpixel:
        for p in paths:  # after the fp16 copy, so each path derives its phase kernels from its own weights
            count, restore = swap_upsamplers(p)
            undo.append(restore)
        prep.applied.append(f"subpixel({count})")
    fast = paths[0]
    if opts.compile:
        compile_cache_dir()
        _set_recompile_limit(64)
        kwargs = {"mode": None if opts.compile == "default" else opts.compile} \
            if opts.compile_backend == "inductor" else {}
        fast = torch.compile(fast, backend=opts.compile_backend, dynamic=False, **kwargs)
        prep.applied.append(f"compile={opts.compile}")
    prep.fast = fast
    if opts.fp16:
        prep.safe = path
    return prep
