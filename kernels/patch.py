"""Swap the fused GroupNorm(+residual)+SiLU kernel into diffusers' UNet2DConditionModel and the
AutoencoderKL decoder at load time, the way stable-fast does it: fuse where norm and activation run back
to back.

- ResnetBlock2D (time_embedding_norm "default", SiLU): norm1 + SiLU -> one kernel; the time-embedding add
  + norm2 + SiLU -> one kernel (the (B, C) time embedding is the kernel's per-channel residual).
- conv_norm_out + conv_act (UNet and decoder): one kernel; conv_act becomes Identity.
- Every other nn.GroupNorm (attention / transformer input norms): the same kernel without activation.
- GEGLU in the transformer feed-forward (UNet): projection, then one kernel for value * GELU(gate).

Parameters are shared, not copied, and keep their state-dict names. `patch_*` return a handle whose
`undo()` puts the original modules back. Patched modules run the torch reference wherever no kernel can
launch (CPU without the interpreter, autograd), so a patched model works everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .geglu import geglu
from .groupnorm import group_norm_act


class GroupNormAct(nn.Module):
    """nn.GroupNorm (+ optional fused SiLU, + optional residual in forward) backed by the Triton kernel."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: str | None = "silu"):
        super().__init__()
        self.num_groups, self.num_channels, self.eps, self.affine, self.act = num_groups, num_channels, eps, affine, act
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels))
            self.bias = nn.Parameter(torch.zeros(num_channels))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_groupnorm(cls, gn: nn.GroupNorm, act: str | None) -> GroupNormAct:
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.num_groups, m.num_channels, m.eps, m.affine, m.act = gn.num_groups, gn.num_channels, gn.eps, gn.affine, act
        m.weight, m.bias = gn.weight, gn.bias  # the same Parameter objects
        return m

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm_act(x, self.weight, self.bias, self.num_groups, self.eps, self.act, residual)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, act={self.act}"


def _resnet_class():
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D


def _fused_resnet_class():
    ResnetBlock2D = _resnet_class()

    class FusedResnetBlock2D(ResnetBlock2D):
        """ResnetBlock2D whose norm1 / norm2 are GroupNormAct(silu); forward as diffusers' without the
        separate activations and with the time embedding added inside norm2's kernel."""

        def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            hidden_states = self.norm1(input_tensor)  # GroupNorm + SiLU
            if self.upsample is not None:
                if hidden_states.shape[0] >= 64:
                    input_tensor = input_tensor.contiguous()
                    hidden_states = hidden_states.contiguous()
                input_tensor = self.upsample(input_tensor)
                hidden_states = self.upsample(hidden_states)
            elif self.downsample is not None:
                input_tensor = self.downsample(input_tensor)
                hidden_states = self.downsample(hidden_states)
            hidden_states = self.conv1(hidden_states)
            if self.time_emb_proj is not None and temb is not None:
                if not self.skip_time_act:
                    temb = self.nonlinearity(temb)
                temb = self.time_emb_proj(temb)  # (B, C): added per channel inside the kernel
                hidden_states = self.norm2(hidden_states, residual=temb)
            else:
                hidden_states = self.norm2(hidden_states)  # GroupNorm + SiLU
            hidden_states = self.dropout(hidden_states)
            hidden_states = self.conv2(hidden_states)
            if self.conv_shortcut is not None:
                input_tensor = self.conv_shortcut(input_tensor)
            if self.output_scale_factor == 1 and hidden_states.dtype == input_tensor.dtype \
                    and hidden_states.shape == input_tensor.shape:
                # Into conv2's fresh output: one pass over the activation instead of two (add, then divide by
                # 1), bit-identical. The decoder's 1024^2 activations are 256 MB per pass at batch 1.
                return hidden_states.add_(input_tensor)
            return (input_tensor + hidden_states) / self.output_scale_factor

    return FusedResnetBlock2D


def _fused_geglu_class():
    from diffusers.models.activations import GEGLU

    class FusedGEGLU(GEGLU):
        def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            return geglu(self.proj(hidden_states))

    return FusedGEGLU


_FUSED_RESNET: type | None = None
_FUSED_GEGLU: type | None = None


def fused_resnet_class() -> type:
    global _FUSED_RESNET
    if _FUSED_RESNET is None:
        _FUSED_RESNET = _fused_resnet_class()
    return _FUSED_RESNET


@dataclass
class PatchHandle:
    """What was swapped, and how to swap it back."""

    counts: dict[str, int] = field(default_factory=dict)
    _undo: list[Callable[[], None]] = field(default_factory=list)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.counts = {}

    def _count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1


def _swap(handle: PatchHandle, parent: nn.Module, name: str, new: nn.Module) -> None:
    old = getattr(parent, name)
    setattr(parent, name, new)
    handle._undo.append(lambda: setattr(parent, name, old))


def _fusable_resnet(block: nn.Module) -> bool:
    if type(block) is not _resnet_class():
        return False
    # "group" is diffusers' name for the decoder's plain GroupNorm resnets (no time embedding).
    norm_kind = block.time_embedding_norm == "default" or (
        block.time_embedding_norm == "group" and block.time_emb_proj is None)
    return (norm_kind and isinstance(block.nonlinearity, nn.SiLU)
            and type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm)


def _patch_tree(root: nn.Module, handle: PatchHandle) -> None:
    fused_cls = fused_resnet_class()
    # 1. Resnet blocks: norm+SiLU pairs, and the time-embedding add.
    for block in list(root.modules()):
        if _fusable_resnet(block):
            _swap(handle, block, "norm1", GroupNormAct.from_groupnorm(block.norm1, "silu"))
            _swap(handle, block, "norm2", GroupNormAct.from_groupnorm(block.norm2, "silu"))
            block.__class__ = fused_cls
            handle._undo.append(lambda b=block: setattr(b, "__class__", _resnet_class()))
            handle._count("resnet")
    # 2. Output norm + activation (UNet and decoder both run conv_norm_out then conv_act).
    norm_out, act = getattr(root, "conv_norm_out", None), getattr(root, "conv_act", None)
    if type(norm_out) is nn.GroupNorm and isinstance(act, nn.SiLU):
        _swap(handle, root, "conv_norm_out", GroupNormAct.from_groupnorm(root.conv_norm_out, "silu"))
        _swap(handle, root, "conv_act", nn.Identity())
        handle._count("norm_out")
    # 3. GEGLU feed-forward activations (the UNet's transformer blocks).
    from diffusers.models.activations import GEGLU

    global _FUSED_GEGLU
    for m in list(root.modules()):
        if type(m) is GEGLU:
            _FUSED_GEGLU = _FUSED_GEGLU or _fused_geglu_class()
            m.__class__ = _FUSED_GEGLU
            handle._undo.append(lambda m=m: setattr(m, "__class__", GEGLU))
            handle._count("geglu")
    # 4. Every remaining plain GroupNorm (attention group_norm, transformer input norm): no activation.
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.GroupNorm:
                _swap(handle, parent, name, GroupNormAct.from_groupnorm(child, None))
                handle._count("groupnorm")


def patch_unet(unet: nn.Module) -> PatchHandle:
    """Fuse GroupNorm(+time embedding)+SiLU throughout a diffusers UNet2DConditionModel, in place."""
    handle = PatchHandle()
    _patch_tree(unet, handle)
    return handle


def patch_vae_decoder(vae: nn.Module) -> PatchHandle:
    """Fuse GroupNorm+SiLU in an AutoencoderKL's decoder (the encoder is not used for generation)."""
    handle = PatchHandle()
    decoder = getattr(vae, "decoder", None)
    if decoder is not None and hasattr(decoder, "up_blocks"):
        _patch_tree(decoder, handle)
    return handle
