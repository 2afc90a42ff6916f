"""The fused kernels swapped into the tiny SDXL UNet and VAE decoder give the unpatched outputs; the torch
backend's switch turns them on and off and images stay within 1/255."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernels.accel import resolve_cuda_graphs, resolve_kernels
from kernels.patch import GroupNormAct, patch_unet, patch_vae_decoder
from nitrofusion.backends.torch_backend import TorchBackend
from nitrofusion.generation import GenerationRequest, generate
from nitrofusion.models import load_model
from nitrofusion.sampler import LCMSampler
from nitrofusion.tiny import tiny_pipeline

from .kernel_utils import DEVICE, needs_kernels


@pytest.fixture(autouse=True)
def no_tf32():
    """On a GPU, TF32 convolutions would round away the tiny GroupNorm differences unevenly: compare in fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def tiny():
    pipe = tiny_pipeline("sdxl", seed=0)
    return pipe.unet.eval().to(DEVICE), pipe.vae.eval().to(DEVICE)


def _unet_inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    enc = torch.randn(batch, 77, 64, generator=g)
    add = {"text_embeds": torch.randn(batch, 32, generator=g), "time_ids": torch.randn(batch, 6, generator=g) * 32}
    return (x.to(DEVICE), torch.tensor([249] * batch, device=DEVICE), enc.to(DEVICE),
            {k: v.to(DEVICE) for k, v in add.items()})


@needs_kernels
@torch.inference_mode()
def test_patched_unet_matches(tiny):
    unet, _ = tiny
    x, t, enc, add = _unet_inputs()
    ref = unet(x, t, enc, added_cond_kwargs=add, return_dict=False)[0]
    keys = list(unet.state_dict())
    handle = patch_unet(unet)
    try:
        # Every resnet fused, the output norm, the transformers' GEGLUs and input norms.
        assert handle.counts == {"resnet": 8, "norm_out": 1, "geglu": 4, "groupnorm": 4}
        assert list(unet.state_dict()) == keys, "state-dict names unchanged"
        assert not any(type(m) is torch.nn.GroupNorm for m in unet.modules())
        out = unet(x, t, enc, added_cond_kwargs=add, return_dict=False)[0]
    finally:
        handle.undo()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, GroupNormAct) for m in unet.modules()), "undo restores the original modules"
    assert {type(m).__name__ for m in unet.modules()}.isdisjoint({"FusedResnetBlock2D", "FusedGEGLU"})
    assert torch.equal(unet(x, t, enc, added_cond_kwargs=add, return_dict=False)[0], ref)


@needs_kernels
@torch.inference_mode()
def test_patched_vae_decoder_matches(tiny):
    _, vae = tiny
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ref = vae.decode(z, return_dict=False)[0]
    handle = patch_vae_decoder(vae)
    try:
        # Every decoder resnet (2 mid + 2 x 2 up), conv_norm_out + conv_act, the mid-block attention norm.
        assert handle.counts == {"resnet": 6, "norm_out": 1, "groupnorm": 1}
        assert isinstance(vae.decoder.conv_act, torch.nn.Identity)
        assert any(type(m) is torch.nn.GroupNorm for m in vae.encoder.modules()), "the encoder is left alone"
        out = vae.decode(z, return_dict=False)[0]
    finally:
        handle.undo()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert isinstance(vae.decoder.conv_act, torch.nn.SiLU)


@needs_kernels
def test_backend_switch_gives_the_same_image(tiny_sdxl_dir):
    """TorchBackend(kernels=True) (CPU under the interpreter here; CUDA on a GPU) vs kernels=False."""
    req = [GenerationRequest("a red cat", steps=1, seed=7, width=32, height=32)]
    images = {}
    for flag in (False, True):
        model = load_model(tiny_sdxl_dir)
        backend = TorchBackend(model, device=DEVICE, dtype="float32", kernels=flag)
        assert backend.accel.kernels is flag
        if flag:
            assert backend.accel.patch_counts()["resnet"] == 8 + 6
        images[flag] = generate(backend, LCMSampler.from_scheduler_config(model.scheduler_config), req, model.shift)[0]
    diff = np.abs(images[True].astype(np.int16) - images[False].astype(np.int16))
    assert diff.max() <= 1


def test_switch_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("NITROFUSION_KERNELS", raising=False)
    monkeypatch.delenv("NITROFUSION_CUDA_GRAPHS", raising=False)
    assert resolve_kernels(None, cpu) is False, "off on the CPU by default"
    assert resolve_kernels(False, cuda) is False
    assert resolve_cuda_graphs(None, cuda) is True, "CUDA graphs are on by default on CUDA"
    assert resolve_cuda_graphs(None, cpu) is False
    monkeypatch.setenv("NITROFUSION_KERNELS", "0")
    assert resolve_kernels(None, cuda) is False, "the environment switch turns the CUDA default off"
    monkeypatch.setenv("NITROFUSION_CUDA_GRAPHS", "0")
    assert resolve_cuda_graphs(None, cuda) is False, "the environment switch turns the CUDA default off"
    assert resolve_cuda_graphs(False, cuda) is False
    monkeypatch.setenv("NITROFUSION_KERNELS", "yes")
    with pytest.raises(ValueError, match="NITROFUSION_KERNELS"):
        resolve_kernels(None, cuda)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_cuda_graphs(True, cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        resolve_kernels(True, cpu)


def test_cpu_backend_default_leaves_models_alone(tiny_sdxl_dir):
    backend = TorchBackend(load_model(tiny_sdxl_dir), device="cpu")
    assert not backend.accel.active
    assert not any(isinstance(m, GroupNormAct) for m in backend.model.unet.modules())
