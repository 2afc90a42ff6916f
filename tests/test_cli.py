"""`nitrofusion generate` end to end as a real process (the image it writes, the one-time export note), and its
one-line argument errors, checked in-process through `cli.main.main(argv)`."""

import numpy as np
import pytest

from cli.main import main
from nitrofusion.generation import GenerationRequest
from nitrofusion.images import decode_image

from .helpers import run_cli


def test_generate_writes_the_same_image_as_the_library(tiny_sdxl_dir, pipelines, tmp_path):
    out = tmp_path / "img.png"
    proc = run_cli("generate", "--model", tiny_sdxl_dir, "--prompt", "a red circle", "--steps", "2",
                   "--seed", "42", "--width", "64", "--height", "48", "--out", out, "--device", "cpu",
                   "--backend", "torch")
    assert proc.returncode == 0, proc.stderr
    assert "seed 42" in proc.stdout
    # Exact, PNG being lossless: the process runs this checkout's code on the same weights with torch's default
    # thread count, as this one does (tests/conftest.py restores it after a test that changes it), and `pipelines`
    # is a new backend for this test, which encodes the prompt alone as the CLI does (not in a batch with other
    # prompts an earlier test asked for, which rounds the SDXL pooled embedding differently).
    expected = pipelines["sdxl"]([GenerationRequest("a red circle", 2, 42, 64, 48)])[0]
    assert np.array_equal(decode_image(out.read_bytes()), expected)


def test_cpu_default_exports_once_into_the_cache_and_says_so(tiny_sd_dir, pipelines, tmp_path):
    """No --backend on the CPU: onnxruntime. The first run exports the model to ONNX and says so on stderr,
    naming the cache folder; the next run reuses the export without a word; images match torch's (2/255)."""
    cache = tmp_path / "cache"
    args = ["generate", "--model", tiny_sd_dir, "--prompt", "a red circle", "--steps", "2", "--seed", "42",
            "--width", "48", "--height", "32", "--device", "cpu"]
    first = run_cli(*args, "--out", tmp_path / "a.png", env={"NITRO_CACHE_DIR": str(cache)}, timeout=600)
    assert first.returncode == 0, first.stderr
    notes = [ln for ln in first.stderr.splitlines() if "to ONNX" in ln]
    assert len(notes) == 1 and "once" in notes[0] and str(cache / "onnx") in notes[0], first.stderr
    assert len([e for e in (cache / "onnx").iterdir() if not e.name.startswith(".")]) == 1
    second = run_cli(*args, "--out", tmp_path / "b.png", env={"NITRO_CACHE_DIR": str(cache)})
    assert second.returncode == 0, second.stderr
    assert "to ONNX" not in second.stderr and len(list((cache / "onnx").iterdir())) == 1
    ref = pipelines["sd"]([GenerationRequest("a red circle", 2, 42, 48, 32)])[0]
    for name in ("a.png", "b.png"):
        image = decode_image((tmp_path / name).read_bytes())
        assert np.abs(image.astype(int) - ref.astype(int)).max() <= 2


def test_generate_defaults_to_native_size_and_random_seed(tiny_sd_dir, tmp_path):
    # --backend torch: this test is about the size and seed defaults; the CPU default backend has its own test
    # (above), and without the flag this test's time would depend on whether an earlier test had exported the
    # model into the session's cache.
    out = tmp_path / "img.jpg"
    proc = run_cli("generate", "--model", tiny_sd_dir, "--backend", "torch", "--prompt", "a dog", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert decode_image(out.read_bytes()).shape == (32, 32, 3)
    assert "seed " in proc.stdout


def _error_line(capsys, argv) -> str:
    """`cli.main.main(argv)` in this process: exit status 2 (returned, or argparse's SystemExit) and exactly
    one line on stderr, which is returned. Logging and warnings go to pytest here, not to stderr; that the real
    process prints nothing else is test_argument_error_is_one_line_from_the_real_process's job."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and not out, (out, err)
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nitrofusion generate: error: "), lines[0]
    return lines[0]


def test_argument_error_is_one_line_from_the_real_process(tmp_path):
    """The console script's exit status is main()'s, and nothing the imports print (warnings, progress bars) joins
    the error line on stderr. The other argument errors are checked in-process (_error_line)."""
    proc = run_cli("generate", "--model", tmp_path / "missing", "--prompt", "a", "--steps", "5",
                   "--out", tmp_path / "x.png")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["nitrofusion generate: error: --steps: must be between 1 and 4, got 5"]
    assert not (tmp_path / "x.png").exists()


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
def test_generate_rejects_bad_parameters(tiny_sd_dir, tmp_path, capsys, extra, field):
    # Checks that are the same on every backend; torch needs no export (the size and prompt checks load the model).
    argv = ["generate", "--model", tiny_sd_dir, "--backend", "torch", "--prompt", "a dog", "--out",
            tmp_path / "x.png", *extra]
    assert f"error: {field}: " in _error_line(capsys, argv)
    assert not (tmp_path / "x.png").exists()


def test_generate_rejects_unknown_output_type(tiny_sd_dir, tmp_path, capsys):
    line = _error_line(capsys, ["generate", "--model", tiny_sd_dir, "--prompt", "a", "--out", tmp_path / "x.gif"])
    assert "--out" in line and ".gif" in line


def test_generate_missing_model_folder(tmp_path, capsys):
    line = _error_line(capsys, ["generate", "--model", tmp_path / "missing", "--prompt", "a",
                                "--out", tmp_path / "x.png"])
    assert "model folder not found" in line


def test_generate_bad_unet_file(tiny_sdxl_dir, tmp_path, capsys):
    bad = tmp_path / "u.safetensors"
    bad.write_bytes(b"junk")
    line = _error_line(capsys, ["generate", "--model", tiny_sdxl_dir, "--unet", bad, "--prompt", "a",
                                "--out", tmp_path / "x.png"])
    assert "UNet file" in line


def test_generate_cuda_without_gpu_is_a_clear_error(tiny_sd_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the error path is for machines without it")
    line = _error_line(capsys, ["generate", "--model", tiny_sd_dir, "--prompt", "a", "--device", "cuda",
                                "--out", tmp_path / "x.png"])
    assert "no CUDA device" in line


def test_missing_prompt_is_argparses_error_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0].startswith("usage: nitrofusion generate")
    assert err.splitlines()[-1] == "nitrofusion generate: error: the following arguments are required: --prompt"
