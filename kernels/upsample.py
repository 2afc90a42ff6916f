"""Nearest 2x upsample + 3x3 conv as ONE 2x2 convolution on the low-resolution input (the sub-pixel form).

diffusers' Upsample2D (every up block of an AutoencoderKL decoder but the last) runs
`conv3x3(interpolate(x, scale_factor=2, mode="nearest"))`. Each of the four output phases (even/odd row x
even/odd column) of that sees a 2x2 neighbourhood of x, with the 3x3 taps summed where two of them land on
the same input pixel:

    phase 0 along an axis: x[i-1] * w[0] + x[i] * (w[1] + w[2])
    phase 1 along an axis: x[i] * (w[0] + w[1]) + x[i+1] * w[2]

So one conv2d with 4 x C_out outputs, a 2x2 kernel and padding 1 over x computes all four phases, and the
phases are interleaved into the (2H, 2W) output. That is 16 multiply-adds per output pixel and input channel
instead of 36 (the three upsample convs are ~27% of the SDXL decoder's 10.5 TFLOP at 1024^2), and the 4x
upsampled input is never written to memory. Pure torch: it runs everywhere, the same on CPU and GPU, and it
is exact up to float summation order (the phase kernels are summed in fp32 and rounded once to the weights'
dtype).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Along one axis: (phase, 2 input taps) <- (3 conv taps). Row p of _TAPS[phase] says which conv taps add up
# onto input tap p (see the module docstring).
_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                      [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) conv weight -> (4 * C_out, C_in, 2, 2): phases (0,0), (0,1), (1,0), (1,1) stacked,
    computed in fp32 and returned in the weight's dtype."""
    taps = _TAPS.to(weight.device)
    k = torch.einsum("apk,oikl,bql->aboipq", taps, weight.float(), taps)  # (2, 2, C_out, C_in, 2, 2)
    return k.reshape(4 * weight.shape[0], *weight.shape[1:2], 2, 2).to(weight.dtype)


def upsample_conv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What Upsample2D computes (the reference)."""
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def subpixel_upsample_conv(x: torch.Tensor, kernels: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(upsample2x(x)) from phase_kernels(weight): (B, C_in, H, W) -> (B, C_out, 2H, 2W), in x's
    memory format (channels-last in, channels-last out)."""
    c_out = kernels.shape[0] // 4
    four_bias = None if bias is None else bias.repeat(4)
    # padding 1 with a 2x2 kernel: output (H+1, W+1); phase (a, b) of output pixel (i, j) sits at (i+a, j+b).
    out = F.conv2d(x, kernels, four_bias, padding=1)
    B, _, H, W = x.shape
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    y = torch.empty((B, c_out, 2 * H, 2 * W), dtype=out.dtype, device=out.device, memory_format=fmt)
    for a in (0, 1):
        for b in (0, 1):
            p = 2 * a + b
            y[:, :, a::2, b::2] = out[:, p * c_out:(p + 1) * c_out, a:a + H, b:b + W]
    return y


class SubpixelUpsample2D(nn.Module):
    """Drop-in for a diffusers Upsample2D(use_conv=True, 3x3, padding 1, nearest 2x, no norm). The phase
    kernels are a buffer derived from the original conv at swap time (re-derive after changing its weights);
    calls with an explicit output_size other than 2x go to the original module."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = [original]  # a list: not registered, so state_dict() keeps only the derived buffers
        conv = original.conv
        w = conv.weight.detach()
        kernels = phase_kernels(w)
        if w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
            kernels = kernels.contiguous(memory_format=torch.channels_last)  # as cuDNN gets the other weights
        self.register_buffer("kernels", kernels, persistent=False)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone(), persistent=False)
        self.channels, self.out_channels = original.channels, original.out_channels

    def forward(self, x: torch.Tensor, output_size=None, *args, **kwargs) -> torch.Tensor:
        if output_size is not None and tuple(output_size) != (2 * x.shape[-2], 2 * x.shape[-1]):
            return self.original[0](x, output_size, *args, **kwargs)
        if self.kernels.dtype != x.dtype or self.kernels.device != x.device:
            raise TypeError(f"SubpixelUpsample2D kernels are {self.kernels.dtype} on {self.kernels.device}, input "
                            f"{x.dtype} on {x.device}: swap after moving the model (or call .to() on it)")
        return subpixel_upsample_conv(x, self.kernels, self.bias)


def convertible(m: nn.Module) -> bool:
    from diffusers.models.upsampling import Upsample2D

    conv = getattr(m, "conv", None)
    return (type(m) is Upsample2D and m.use_conv and not m.use_conv_transpose and m.interpolate
            and m.norm is None and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3)
            and conv.padding == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1)


def swap_upsamplers(root: nn.Module) -> tuple[int, Callable[[], None]]:
    """Replace every convertible Upsample2D under root in place; returns (count, undo)."""
    undo: list[Callable[[], None]] = []
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if convertible(child):
                setattr(parent, name, SubpixelUpsample2D(child))
                undo.append(lambda p=parent, n=name, c=child: setattr(p, n, c))

    def restore() -> None:
        while undo:
            undo.pop()()

    return len(undo), restore
