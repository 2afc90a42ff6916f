"""Fuzz the OpenAPI schema with schemathesis against a real server: no input may produce a 5xx, and
schema-invalid input must be rejected."""

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .helpers import ServerProcess

ST = str(Path(sys.executable).parent / "st")


@pytest.fixture(scope="module")
def server(tiny_sd_dir):
    srv = ServerProcess("--model", tiny_sd_dir, "--device", "cpu", env={"NITRO_MAX_QUEUE": "1000"})
    srv.wait_ready("/readyz")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_no_input_produces_a_server_error(server, tmp_path):
    proc = subprocess.run(
        [ST, "run", server.url + "/openapi.json", "--checks", "not_a_server_error,negative_data_rejection",
         "--max-examples", "25", "--seed", "1", "--workers", "1", "--generation-database", "none",
         "--phases", "examples,coverage,fuzzing", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert httpx.get(server.url + "/healthz").status_code == 200
