"""`nitrofusion generate` end to end as a real process, and its one-line errors."""

import numpy as np
import pytest

from nitrofusion.generation import GenerationRequest
from nitrofusion.images import decode_image

from .helpers import run_cli


def _assert_one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "usage:", " "))]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_generate_writes_the_same_image_as_the_library(tiny_sdxl_dir, pipelines, tmp_path):
    out = tmp_path / "img.png"
    proc = run_cli("generate", "--model", tiny_sdxl_dir, "--prompt", "a red circle", "--steps", "2",
                   "--seed", "42", "--width", "64", "--height", "48", "--out", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert "seed 42" in proc.stdout
    expected = pipelines["sdxl"]([GenerationRequest("a red circle", 2, 42, 64, 48)])[0]
    assert np.array_equal(decode_image(out.read_bytes()), expected)


def test_generate_defaults_to_native_size_and_random_seed(tiny_sd_dir, tmp_path):
    out = tmp_path / "img.jpg"
    proc = run_cli("generate", "--model", tiny_sd_dir, "--prompt", "a dog", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert decode_image(out.read_bytes()).shape == (32, 32, 3)
    assert "seed " in proc.stdout


@pytest.mark.parametrize(
    "extra, field",
    [
        (["--steps", "5"], "--steps"),
        (["--steps", "0"], "--steps"),
        (["--width", "30"], "--width"),
        (["--height", "4096"], "--height"),
        (["--prompt", "   "], "--prompt"),
        (["--prompt", "a red circle " * 40], "--prompt"),
        (["--seed", "-1"], "--seed"),
    ],
)
def test_generate_rejects_bad_parameters(tiny_sd_dir, tmp_path, extra, field):
    args = ["generate", "--model", tiny_sd_dir, "--prompt", "a dog", "--out", tmp_path / "x.png", *extra]
    proc = run_cli(*args)
    _assert_one_line_error(proc, field)
    assert not (tmp_path / "x.png").exists()


def test_generate_rejects_unknown_output_type(tiny_sd_dir, tmp_path):
    _assert_one_line_error(run_cli("generate", "--model", tiny_sd_dir, "--prompt", "a", "--out", tmp_path / "x.gif"),
                           "--out", ".gif")


def test_generate_missing_model_folder(tmp_path):
    _assert_one_line_error(run_cli("generate", "--model", tmp_path / "missing", "--prompt", "a",
                                   "--out", tmp_path / "x.png"), "model folder not found")


def test_generate_bad_unet_file(tiny_sdxl_dir, tmp_path):
    bad = tmp_path / "u.safetensors"
    bad.write_bytes(b"junk")
    _assert_one_line_error(run_cli("generate", "--model", tiny_sdxl_dir, "--unet", bad, "--prompt", "a",
                                   "--out", tmp_path / "x.png"), "UNet file")


def test_generate_cuda_without_gpu_is_a_clear_error(tiny_sd_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    _assert_one_line_error(run_cli("generate", "--model", tiny_sd_dir, "--prompt", "a", "--device", "cuda",
                                   "--out", tmp_path / "x.png"), "no CUDA device")
