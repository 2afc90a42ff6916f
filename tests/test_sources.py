"""Where models come from (nitrofusion/sources.py, single_file.py): cached Hugging Face repo ids read offline,
hub-style UNet files, and single-file checkpoints in the original layout. Each gives the folder's image."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from nitrofusion.errors import ModelLoadError
from nitrofusion.generation import GenerationRequest
from nitrofusion.images import decode_image
from nitrofusion.pipeline import load_pipeline
from nitrofusion.single_file import SHIPPED_CONFIGS, load_tokenizer, read_keys
from nitrofusion.sources import resolve_model, resolve_unet
from nitrofusion.tiny import save_tiny_model, tiny_pipeline, tiny_unet

from .helpers import assert_one_line_error, run_cli
from .ldm_layout import write_single_file

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"
REQ = GenerationRequest("a red circle", 2, 7, 32, 32)


def fake_hub_cache(cache, repo_id, folder, commit=COMMIT, ref="main"):
    """Lay `folder` out as huggingface_hub caches a download: blobs named by their hash, per-commit snapshot
    folders of relative symlinks to them, and refs/<branch> holding the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, blob)
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def image(pipe, req=REQ):
    return pipe([req])[0].astype(int)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def single_files(tmp_path_factory):
    """Per family: a tiny diffusers folder and the same weights as one original-layout checkpoint. SDXL's second
    text encoder is wider than its first (48 vs 32), as in SDXL, which is how diffusers tells them apart."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for fam in ("sdxl", "sd"):
        folder = save_tiny_model(root / fam, fam, seed=0, te2_width=48)
        out[fam] = (folder, write_single_file(tiny_pipeline(fam, seed=0, te2_width=48), root / f"{fam}.safetensors"))
    return out


# ------------------------------------------------------------------------------------ Hugging Face cache ids


def test_cached_repo_id_gives_the_folders_image(tiny_sdxl_dir, pipelines, hub):
    snapshot = fake_hub_cache(hub, "tiny-org/tiny-sdxl", tiny_sdxl_dir)
    pipe = load_pipeline("tiny-org/tiny-sdxl", device="cpu", backend="torch")
    assert np.array_equal(image(pipe), image(pipelines["sdxl"]))
    assert pipe.model.name == "tiny-org/tiny-sdxl"
    source = pipe.model.extras["source"]
    assert (source["path"], source["revision"], source["kind"]) == (str(snapshot), COMMIT, "hub")


def test_revision_branch_and_hf_home(tiny_sd_dir, tiny_sdxl_dir, hub, monkeypatch):
    fake_hub_cache(hub, "org/model", tiny_sd_dir)
    other = fake_hub_cache(hub, "org/model", tiny_sdxl_dir, commit=OTHER, ref="dev")
    assert resolve_model("org/model").revision == COMMIT
    assert resolve_model("org/model@dev").path == other
    assert resolve_model(f"org/model@{OTHER}").revision == OTHER
    # HF_HOME/hub when HF_HUB_CACHE is not set
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub.parent / "home"))
    shutil.copytree(hub, hub.parent / "home" / "hub", symlinks=True)
    assert resolve_model("org/model").path == hub.parent / "home" / "hub" / "models--org--model" / "snapshots" / COMMIT


def test_absent_id_names_the_id_the_cache_and_the_command(tmp_path):
    cache = tmp_path / "empty-cache"
    proc = run_cli("generate", "--model", "nobody/nothing@v2", "--prompt", "x", "--out", tmp_path / "o.png",
                   env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "'nobody/nothing@v2'", str(cache), "hf download nobody/nothing --revision v2",
                           "HF_HUB_OFFLINE unset")
    assert not cache.exists() or not any(cache.iterdir())  # looked, wrote nothing


def test_snapshot_downloaded_in_part_is_used(tiny_sd_dir, pipelines, hub):
    """A download limited to some files (`hf download --include ...`) leaves huggingface_hub's cached listing of
    the whole repo beside a partial snapshot, which it calls incomplete; what the model needs is there."""
    snapshot = fake_hub_cache(hub, "org/big", tiny_sd_dir)
    listing = {"format_version": 1, "files": {"v1-5-pruned.safetensors": {"size": 7, "blob_id": "0" * 40}}}
    (hub / "models--org--big" / "trees").mkdir()
    (hub / "models--org--big" / "trees" / f"{COMMIT}.json").write_text(json.dumps(listing))
    assert resolve_model("org/big").path == snapshot
    assert np.array_equal(image(load_pipeline("org/big", device="cpu", backend="torch")), image(pipelines["sd"]))


def test_repo_of_single_files_points_at_the_file_form(tmp_path, hub):
    files = tmp_path / "repo"
    files.mkdir()
    (files / "nitrosd-realism_unet.safetensors").write_bytes(b"x")
    fake_hub_cache(hub, "ChenDY/NitroFusion", files)
    with pytest.raises(ModelLoadError, match="ChenDY/NitroFusion/nitrosd-realism_unet.safetensors"):
        resolve_model("ChenDY/NitroFusion")


def test_partial_snapshot_says_how_to_fetch_it(tiny_sd_dir, tmp_path, hub):
    partial = tmp_path / "partial"
    shutil.copytree(tiny_sd_dir, partial)
    shutil.rmtree(partial / "vae")
    fake_hub_cache(hub, "org/partial", partial)
    with pytest.raises(ModelLoadError, match="no 'vae' component.*hf download org/partial"):
        load_pipeline("org/partial", device="cpu", backend="torch")


def test_unet_from_the_cache_is_swapped_in(tiny_sdxl_dir, tmp_path, hub):
    from safetensors.torch import save_file

    files = tmp_path / "unets"
    files.mkdir()
    save_file(tiny_unet("sdxl").state_dict(), str(files / "nitro_unet.safetensors"))
    fake_hub_cache(hub, "org/unets", files)
    assert resolve_unet("org/unets/nitro_unet.safetensors").revision == COMMIT
    local = load_pipeline(tiny_sdxl_dir, files / "nitro_unet.safetensors", device="cpu", backend="torch")
    cached = load_pipeline(tiny_sdxl_dir, "org/unets/nitro_unet.safetensors", device="cpu", backend="torch")
    assert np.array_equal(image(local), image(cached))
    assert cached.model.extras["source"]["unet"]["given"] == "org/unets/nitro_unet.safetensors"
    with pytest.raises(ModelLoadError, match="hf download org/unets other.safetensors"):
        resolve_unet("org/unets/other.safetensors")


# ------------------------------------------------------------------------------------ single-file checkpoints


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_single_file_gives_the_folders_image(single_files, family):
    folder, checkpoint = single_files[family]
    ref = load_pipeline(folder, device="cpu", backend="torch")
    pipe = load_pipeline(checkpoint, device="cpu", backend="torch", config=folder)
    assert pipe.model.family == family and pipe.model.name == checkpoint.name
    assert np.abs(image(pipe) - image(ref)).max() <= 1
    assert pipe.shift == 250  # a single file carries no shift: --shift, else the default
    assert load_pipeline(checkpoint, shift=500, device="cpu", backend="torch", config=folder).shift == 500


@pytest.mark.slow  # a CLI process that exports to ONNX (~8 s)
def test_single_file_from_the_cache_through_the_cli_default_backend(single_files, tmp_path, hub):
    """The CPU default (onnxruntime) exports the single file once; the cache entry records the name as given."""
    folder, checkpoint = single_files["sdxl"]
    files = tmp_path / "repo"
    files.mkdir()
    shutil.copy(checkpoint, files / "tiny_comfyui.safetensors")
    fake_hub_cache(hub, "org/ckpts", files)
    cache = tmp_path / "nitro-cache"
    proc = run_cli("generate", "--model", "org/ckpts/tiny_comfyui.safetensors", "--config", folder, "--prompt",
                   REQ.prompt, "--steps", "2", "--seed", "7", "--device", "cpu", "--out", tmp_path / "a.png",
                   env={"NITRO_CACHE_DIR": str(cache), "HF_HUB_CACHE": str(hub)}, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "org/ckpts/tiny_comfyui.safetensors" in proc.stderr and COMMIT in proc.stderr  # the export note
    ref = image(load_pipeline(folder, device="cpu", backend="torch"))
    assert np.abs(decode_image((tmp_path / "a.png").read_bytes()).astype(int) - ref).max() <= 2
    (entry,) = [e for e in (cache / "onnx").iterdir() if not e.name.startswith(".")]
    source = json.loads((entry / "nitrofusion_export.json").read_text())["source"]
    assert source["given"] == "org/ckpts/tiny_comfyui.safetensors" and source["revision"] == COMMIT
    assert source["kind"] == "single_file" and source["config"] == str(folder)


def test_unet_only_single_file_takes_the_rest_from_the_base(single_files, tmp_path, hub):
    """A UNet-only original-layout file (ComfyUI's models/unet): text encoders and VAE from --config, else from
    SDXL base in the Hugging Face cache, else an error that says both ways."""
    from safetensors.torch import save_file

    from .ldm_layout import unet_to_ldm

    folder, _ = single_files["sdxl"]
    pipe = tiny_pipeline("sdxl", seed=0, te2_width=48)
    unet_only = tmp_path / "unet_comfyui.safetensors"
    save_file(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config.layers_per_block), str(unet_only))
    with pytest.raises(ModelLoadError, match="no vae and no text encoders.*--config.*hf download stabilityai/"):
        resolve_model(unet_only)
    ref = image(load_pipeline(folder, device="cpu", backend="torch"))
    assert np.abs(image(load_pipeline(unet_only, device="cpu", backend="torch", config=folder)) - ref).max() <= 1
    snapshot = fake_hub_cache(hub, "stabilityai/stable-diffusion-xl-base-1.0", folder)
    assert resolve_model(unet_only).config == snapshot
    assert np.abs(image(load_pipeline(unet_only, device="cpu", backend="torch")) - ref).max() <= 1


def test_truncated_single_file_is_a_clear_error(single_files, tmp_path):
    folder, checkpoint = single_files["sd"]
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        read_keys(cut)
    proc = run_cli("generate", "--model", cut, "--prompt", "x", "--out", tmp_path / "o.png")
    assert_one_line_error(proc, str(cut), "truncated or damaged")


def test_unet_only_file_as_model_points_at_unet(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "nitrosd-realism_unet.safetensors"
    save_file(tiny_unet("sd").state_dict(), str(f))
    with pytest.raises(ModelLoadError, match="pass it as --unet"):
        resolve_model(f)


def test_without_config_the_shipped_architecture_is_used(single_files):
    """The tiny checkpoint is SDXL-layout, so the shipped SDXL-base configs are picked; they do not fit its
    shapes, and the error says which configs were used."""
    _, checkpoint = single_files["sdxl"]
    assert resolve_model(checkpoint).config == SHIPPED_CONFIGS["sdxl"]
    with pytest.raises(ModelLoadError, match="configs in .*sdxl-base"):
        load_pipeline(checkpoint, device="cpu", backend="torch")


def test_config_must_match_the_checkpoint_family(single_files):
    sd_folder, _ = single_files["sd"]
    _, xl_checkpoint = single_files["sdxl"]
    with pytest.raises(ModelLoadError, match="SDXL checkpoint but --config"):
        resolve_model(xl_checkpoint, sd_folder)


# ------------------------------------------------------------------------------------ the shipped configs


def test_shipped_tokenizers_are_clips():
    """The CLIP vocabulary derived from the shipped merges: CLIP's ids for a known prompt, 49408 tokens; SDXL's
    second tokenizer pads with "!" (id 0), the first with the end token."""
    tok = load_tokenizer(SHIPPED_CONFIGS["sdxl"] / "tokenizer")
    tok2 = load_tokenizer(SHIPPED_CONFIGS["sdxl"] / "tokenizer_2")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.pad_token_id, tok2.pad_token_id) == (49407, 0)
    assert load_tokenizer(SHIPPED_CONFIGS["sd"] / "tokenizer")("a dog").input_ids == [49406, 320, 1929, 49407]


def test_shipped_configs_build_the_published_architectures():
    """Built on the meta device (no memory): the parameter counts of SDXL base and SD1.5 as published."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def count(module):
        return sum(p.numel() for p in module.parameters())

    xl, sd = SHIPPED_CONFIGS["sdxl"], SHIPPED_CONFIGS["sd"]
    with init_empty_weights():
        assert count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(xl / "unet"))) == 2_567_463_684
        assert count(UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(sd / "unet"))) == 859_520_964
        assert count(AutoencoderKL.from_config(AutoencoderKL.load_config(xl / "vae"))) == 83_653_863
        assert count(CLIPTextModel(CLIPTextConfig.from_pretrained(xl / "text_encoder"))) == 123_060_480
        assert count(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(xl / "text_encoder_2"))) == 694_659_840


@pytest.mark.parametrize("family", ["sdxl", "sd"])
def test_shipped_config_folders_load_a_single_file(family, tmp_path):
    """The shipped folders as they are (model_index, scheduler, tokenizers derived from the merges), their
    architectures shrunk to the tiny ones: a checkpoint in the original layout loads and gives the image of the
    same weights saved as a diffusers folder."""
    import torch
    from diffusers import EulerDiscreteScheduler, PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = tmp_path / "config"
    shutil.copytree(SHIPPED_CONFIGS[family], config)
    tiny = tiny_pipeline(family, seed=0, te2_width=48)
    tiny.unet.save_config(config / "unet")
    tiny.vae.save_config(config / "vae")
    encoders = {"text_encoder": (CLIPTextModel, 32)}
    if family == "sdxl":
        encoders["text_encoder_2"] = (CLIPTextModelWithProjection, 48)
    torch.manual_seed(1)
    parts = {"unet": tiny.unet, "vae": tiny.vae}
    for name, (cls, width) in encoders.items():
        c = json.loads((config / name / "config.json").read_text())
        c.update(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=3, projection_dim=32)
        (config / name / "config.json").write_text(json.dumps(c))
        parts[name] = cls(CLIPTextConfig.from_pretrained(config / name))  # the real 49408-token vocabulary
    for name in ("tokenizer", "tokenizer_2")[: len(encoders)]:
        parts[name] = load_tokenizer(config / name)
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, scheduler=EulerDiscreteScheduler.from_pretrained(config / "scheduler"))
    else:
        pipe = StableDiffusionPipeline(**parts, scheduler=PNDMScheduler.from_pretrained(config / "scheduler"),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "folder")
    checkpoint = write_single_file(pipe, tmp_path / "model.safetensors")
    ref = load_pipeline(tmp_path / "folder", device="cpu", backend="torch")
    loaded = load_pipeline(checkpoint, device="cpu", backend="torch", config=config)
    assert np.abs(image(loaded) - image(ref)).max() <= 1
    assert loaded.model.max_prompt_tokens == 77 and len(loaded.model.tokenizers[-1]) == 49408


def test_models_endpoint_shows_name_path_and_revision(tiny_sd_dir, hub):
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    fake_hub_cache(hub, "org/tiny-sd", tiny_sd_dir)
    settings = ServerSettings(warmup=False)
    pipe = load_pipeline("org/tiny-sd", device="cpu", backend="torch", buckets=settings.buckets)
    with TestClient(create_app(pipe, settings)) as client:
        card = client.get("/v1/models").json()["data"][0]
    assert (card["id"], card["revision"]) == ("org/tiny-sd", COMMIT)
    assert card["path"].endswith(f"models--org--tiny-sd/snapshots/{COMMIT}")
