"""Decoder-speed options (kernels/vae_fast.py, kernels/upsample.py) against the plain diffusers decoder on a tiny
AutoencoderKL: every option that runs on the CPU gives the same image, CUDA-only ones are skipped with a
reason, undo() restores the model, the fp16 guard re-decodes exactly the non-finite rows (also through the
backend's CUDA-graph cache), and on a GPU the real fp16 / cuDNN / channels-last paths hold the bf16 image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kernels.upsample import SubpixelUpsample2D, phase_kernels, subpixel_upsample_conv, upsample_conv_ref
from kernels.vae_fast import ENV, DecoderOptions, PreparedDecoder, options_from_env, prepare_decoder
from nitrofusion.tiny import _tiny_vae, tiny_preview_decoder

from .kernel_utils import needs_cuda
from .test_kernels_cuda_graphs import FakeCapturer


def _vae(seed: int = 0, device: str = "cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return _tiny_vae().eval().requires_grad_(False).to(device, dtype)


def _z(b: int = 2, h: int = 8, w: int = 6, device: str = "cpu", dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(b, 4, h, w, generator=torch.Generator().manual_seed(3)) * 2).to(device, dtype)


def test_options_text_form_round_trips_and_names_bad_options(monkeypatch):
    o = DecoderOptions.parse("channels_last, subpixel,compile=max-autotune-no-cudagraphs,fp16")
    assert (o.channels_last, o.subpixel, o.fp16, o.compile, o.cudnn_benchmark) == (
        True, True, True, "max-autotune-no-cudagraphs", False)
    assert DecoderOptions.parse(o.spec()) == o
    assert DecoderOptions.parse("compile").compile == "default"
    assert DecoderOptions.parse("") == DecoderOptions.parse("default") == DecoderOptions()
    with pytest.raises(ValueError, match=ENV):
        DecoderOptions.parse("channels_last,turbo")
    with pytest.raises(ValueError, match="compile mode"):
        DecoderOptions.parse("compile=fastest")
    monkeypatch.setenv(ENV, "cudnn_benchmark")
    assert options_from_env(None, kernels=True) == DecoderOptions(kernels=True, cudnn_benchmark=True)
    assert options_from_env("subpixel") == DecoderOptions(subpixel=True), "an explicit mode beats the environment"


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 3, 1, 4)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_subpixel_upsample_conv_is_upsample_then_conv(shape, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w, b = torch.randn(4, shape[1], 3, 3, generator=g), torch.randn(4, generator=g) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = subpixel_upsample_conv(x, phase_kernels(w), b)
    torch.testing.assert_close(out, upsample_conv_ref(x, w, b), rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last) == (channels_last and shape[2] * shape[3] > 1)


def test_subpixel_module_defers_other_output_sizes_to_the_original():
    from diffusers.models.upsampling import Upsample2D

    torch.manual_seed(0)
    up = Upsample2D(4, use_conv=True).eval()
    sub = SubpixelUpsample2D(up)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(sub(x), up(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sub(x, output_size=(11, 11)), up(x, output_size=(11, 11)))
    assert sub.state_dict() == {}, "derived buffers are not saved; the original conv keeps the weights"


OPTION_SETS = ["", "channels_last", "subpixel", "channels_last,subpixel", "compile", "channels_last,subpixel,compile"]


@pytest.mark.parametrize("spec", OPTION_SETS)
def test_every_cpu_option_decodes_like_diffusers_and_undo_restores(spec):
    vae, z = _vae(), _z()
    with torch.inference_mode():
        ref = vae.decode(z).sample
        prep = prepare_decoder(vae, DecoderOptions.parse(spec, compile_backend="eager"))
        out = prep(z)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert not prep.skipped
        assert len(prep.applied) == len([t for t in spec.split(",") if t])
        prep.undo()
        assert not any(isinstance(m, SubpixelUpsample2D) for m in vae.modules())
        assert all(p.is_contiguous() for p in vae.parameters()), "channels-last weights converted back"
        assert torch.equal(vae.decode(z).sample, ref)


def test_cuda_only_options_are_skipped_on_the_cpu_with_a_reason(monkeypatch):
    monkeypatch.setattr("kernels.vae_fast.interpreting", lambda: False)
    before = torch.backends.cudnn.benchmark
    vae, z = _vae(), _z()
    prep = prepare_decoder(vae, DecoderOptions(kernels=True, cudnn_benchmark=True, fp16=True))
    assert set(prep.skipped) == {"kernels", "cudnn_benchmark", "fp16"} and all(prep.skipped.values())
    assert prep.applied == [] and not prep.guarded and torch.backends.cudnn.benchmark == before
    with torch.inference_mode():
        torch.testing.assert_close(prep(z), vae.decode(z).sample)


def test_graph_capturing_compile_modes_are_refused_inside_our_graphs():
    with pytest.raises(ValueError, match="reduce-overhead"):
        prepare_decoder(_vae(), DecoderOptions(compile="reduce-overhead"), graphs=True)


def test_tiny_decoder_takes_the_same_options():
    torch.manual_seed(0)
    tiny = tiny_preview_decoder().eval().requires_grad_(False)
    z = _z()
    with torch.inference_mode():
        ref = tiny.decode(z).sample
        prep = prepare_decoder(tiny, DecoderOptions(channels_last=True, compile="default", compile_backend="eager"))
        torch.testing.assert_close(prep(z), ref, rtol=1e-5, atol=1e-5)


def _guarded(bad_rows: set[int]) -> PreparedDecoder:
    """A guarded decoder whose fast path returns NaN in `bad_rows` (an fp16 overflow stand-in)."""
    vae = _vae()

    def fast(z):
        image = vae.decode(z.float()).sample
        for i in bad_rows:
            if i < image.shape[0]:
                image[i, 0, 0, 0] = float("nan")
        return image

    return PreparedDecoder(DecoderOptions(fp16=True), fast=fast, safe=lambda z: vae.decode(z).sample + 10)


def test_fp16_guard_re_decodes_only_the_non_finite_rows():
    prep, z = _guarded({1, 3}), _z(b=4)
    with torch.inference_mode():
        image, ok = prep.decode_flagged(z)
        assert ok.tolist() == [True, False, True, False]
        out = prep(z)
    assert torch.isfinite(out).all() and prep.fallback_rows == 2
    assert (out[[1, 3]] > 5).all() and (out[[0, 2]] < 5).all(), "safe path (the +10 marker) only on bad rows"


def test_fp16_guard_through_the_backend_graph_cache(tiny_sdxl_dir):
    """Accelerator.decode with graphs (a fake capture): the graphed half returns image + flags, padded rows
    are cut off, and the host repairs the flagged row with the safe path through the same postprocess."""
    from nitrofusion.backends.torch_backend import TorchBackend
    from nitrofusion.models import load_model

    backend = TorchBackend(load_model(tiny_sdxl_dir), device="cpu", kernels=False, buckets=(1, 4))
    acc = backend.accel
    acc.vae_decoder = _guarded({1})
    acc.build_graphs(FakeCapturer())
    z = _z(b=3)
    with torch.inference_mode():
        out = acc.decode(z)
        plain = acc._post(acc.vae_decoder.safe(z)).numpy()
    assert out.shape == (3, 16, 12, 3) and out.dtype == np.uint8
    assert acc.vae_graphs.summary()["replays"] == 1 and acc.vae_decoder.fallback_rows == 1
    assert np.array_equal(out[1], plain[1]) and not np.array_equal(out[0], plain[0])


def test_backend_takes_the_mode_from_the_environment(tiny_sdxl_dir, monkeypatch):
    from nitrofusion.backends.torch_backend import TorchBackend
    from nitrofusion.generation import GenerationRequest, generate
    from nitrofusion.models import load_model
    from nitrofusion.sampler import LCMSampler

    reqs = [GenerationRequest("a red cat", steps=2, seed=5, width=32, height=32)]
    images = {}
    for mode in ("", "channels_last,subpixel"):
        monkeypatch.setenv(ENV, mode)
        model = load_model(tiny_sdxl_dir)
        backend = TorchBackend(model, device="cpu", kernels=False)
        assert backend.accel.active == bool(mode)
        images[mode] = generate(backend, LCMSampler.from_scheduler_config(model.scheduler_config), reqs, model.shift)[0]
    assert np.abs(images[""].astype(np.int16) - images["channels_last,subpixel"].astype(np.int16)).max() <= 1


@needs_cuda
def test_cuda_options_hold_the_bf16_image_and_fp16_overflow_falls_back():
    vae, z = _vae(device="cuda", dtype=torch.bfloat16), _z(device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = vae.decode(z).sample.float()
        prep = prepare_decoder(vae, DecoderOptions(kernels=True, channels_last=True, cudnn_benchmark=True,
                                                   subpixel=True, fp16=True))
        assert not prep.skipped and prep.guarded
        out = prep(z).float()
        assert (out - ref).abs().max() < 0.05 and prep.fallback_rows == 0
        prep.undo()
        # Overflow fp16 (max 65504) but not bf16: a huge first conv; the GroupNorm after it rescales.
        vae.decoder.conv_in.weight.mul_(1e5)
        ref = vae.decode(z).sample.float()
        assert torch.isfinite(ref).all()
        prep = prepare_decoder(vae, DecoderOptions(fp16=True))
        out = prep(z).float()
        assert torch.isfinite(out).all() and prep.fallback_rows == z.shape[0]
        assert F.l1_loss(out, ref) < 0.02
