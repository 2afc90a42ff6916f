"""Two CPU processes (gloo) through torchrun: the same entry point `accelerate launch` uses for DDP on GPUs.

Kept short (tiny models, two steps per stage) so it runs in CI with the rest of the suite.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import recipe
from trainer.recipe import run

from .helpers import free_port

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_two_process_cpu_ddp_runs_every_distributed_stage(tmp_path):
    run(recipe("tiny"), tmp_path, tmp_path / "model", ["autoencoder", "text"])  # in-process, 1 rank
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "trainer", "--recipe", "tiny", "--work", str(tmp_path), "--out", str(tmp_path / "model"),
         "--stage", "teacher", "--stage", "cache", "--stage", "init", "--stage", "nitro", "--stage", "export"],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("teacher", "init", "nitro"):
        ckpt = tmp_path / stage / "checkpoint"
        state = json.loads((ckpt / "state.json").read_text())
        assert state == {"stage": stage, "step": 2, "world_size": 2}
        assert (ckpt / "rng_0.pt").is_file() and (ckpt / "rng_1.pt").is_file()  # each rank's RNG
    assert sorted(p.name for p in (tmp_path / "cache").glob("chunk_*.pt")) == ["chunk_00000.pt", "chunk_00001.pt"]
    assert (tmp_path / "model" / "model_index.json").is_file()
    shutil.rmtree(tmp_path)


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
@pytest.mark.slow  # two training processes (~13 s)
def test_two_process_from_run_shares_the_cache(tiny_sdxl_dir, tmp_path):
    """`--from` under torchrun: both ranks load the model, build the cache's chunks between them and read each
    other's chunks in the init and stage 3."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\nphoto of the cat\n")
    proc = subprocess.run(
        [str(TORCHRUN), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "trainer", "--from", str(tiny_sdxl_dir), "--prompts", str(prompts), "--work", str(tmp_path / "w"),
         "--smoke", "--set", "nitro.optim.batch_size=1"],
        capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage, steps in (("init", 2), ("nitro", 4)):
        state = json.loads((tmp_path / "w" / stage / "checkpoint" / "state.json").read_text())
        assert state == {"stage": stage, "step": steps, "world_size": 2}
    assert json.loads((tmp_path / "w" / "cache" / "index.json").read_text()) == {"pairs": 4, "chunk_size": 2}
    assert (tmp_path / "w" / "model" / "model_index.json").is_file()
