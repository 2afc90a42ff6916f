"""Loading model folders: families, shift resolution, UNet swaps, and every load error's message."""

import json
import shutil

import numpy as np
import pytest
from safetensors.torch import save_file

from nitrofusion.errors import ModelLoadError
from nitrofusion.generation import GenerationRequest
from nitrofusion.models import load_model
from nitrofusion.pipeline import load_pipeline
from nitrofusion.tiny import save_tiny_model, tiny_unet


@pytest.fixture
def model_copy(tiny_sdxl_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_sdxl_dir, dst)
    return dst


def test_loads_both_families(tiny_sdxl_dir, tiny_sd_dir):
    xl, sd = load_model(tiny_sdxl_dir), load_model(tiny_sd_dir)
    assert (xl.family, len(xl.text_encoders)) == ("sdxl", 2)
    assert (sd.family, len(sd.text_encoders)) == ("sd", 1)
    assert xl.native_size == 32 and xl.max_prompt_tokens == 77


def test_shift_from_model_folder_wins_over_flag(tmp_path):
    d = save_tiny_model(tmp_path / "vibrant", "sd", shift=500)
    assert load_model(d).shift == 500
    assert load_model(d, shift=250).shift == 500


def test_shift_flag_then_default(tiny_sd_dir):
    assert load_model(tiny_sd_dir).shift == 250
    assert load_model(tiny_sd_dir, shift=500).shift == 500


def test_unet_file_is_swapped_in(tiny_sdxl_dir, tmp_path):
    other = tiny_unet("sdxl")  # same architecture, other random weights
    f = tmp_path / "other_unet.safetensors"
    save_file(other.state_dict(), str(f))
    base = load_pipeline(tiny_sdxl_dir, device="cpu", backend="torch")
    swapped = load_pipeline(tiny_sdxl_dir, unet_file=f, device="cpu", backend="torch")
    for k, v in other.state_dict().items():
        assert np.array_equal(swapped.model.unet.state_dict()[k].numpy(), v.numpy())
    req = [GenerationRequest("a red circle", 1, 3, 32, 32)]
    assert np.abs(base(req)[0].astype(int) - swapped(req)[0].astype(int)).max() > 8


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        load_model(tmp_path / "nope")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(tmp_path)


def test_missing_component(model_copy):
    shutil.rmtree(model_copy / "text_encoder_2")
    with pytest.raises(ModelLoadError, match="no 'text_encoder_2' component"):
        load_model(model_copy)


def test_broken_component_weights(model_copy):
    for f in (model_copy / "vae").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="cannot load 'vae'"):
        load_model(model_copy)


def test_unsupported_pipeline_class(model_copy):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unsupported pipeline class 'FluxPipeline'"):
        load_model(model_copy)


def test_unet_file_for_another_architecture(tiny_sdxl_dir, tmp_path):
    f = tmp_path / "sd_unet.safetensors"
    save_file(tiny_unet("sd").state_dict(), str(f))  # SD1.x UNet onto an SDXL model
    with pytest.raises(ModelLoadError, match="does not fit this model's UNet architecture"):
        load_model(tiny_sdxl_dir, unet_file=f)


def test_unet_file_missing_or_unreadable(tiny_sdxl_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="UNet file not found"):
        load_model(tiny_sdxl_dir, unet_file=tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_model(tiny_sdxl_dir, unet_file=bad)


def test_components_from_different_families(tiny_sdxl_dir, tiny_sd_dir, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_sd_dir, mixed)
    shutil.rmtree(mixed / "unet")
    shutil.copytree(tiny_sdxl_dir / "unet", mixed / "unet")
    with pytest.raises(ModelLoadError, match="text embeddings of width"):
        load_model(mixed)
