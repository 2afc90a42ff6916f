"""Running the real `nitrofusion` command, and a real server process, from tests.

Both inherit the environment, so NITRO_CACHE_DIR is the session's temporary cache (tests/conftest.py): on the
CPU the default backend (onnxruntime) exports a model on first use, and that export never goes to ~/.cache."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def _console_script() -> list[str]:
    """The `nitrofusion` console script of this checkout: what pip's wrapper runs (the entry point pyproject.toml
    declares), started with this interpreter. Not <venv>/bin/nitrofusion: a virtual environment shared by several
    checkouts holds the wrapper of whichever was installed last, and its entry point (and the code it imports
    through the editable install) may be another checkout's."""
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["nitrofusion"]
    module, func = target.split(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


CLI = _console_script()  # argv prefix: [*CLI, "generate", ...]


def load_script(relpath: str):
    """Import a repository script that is not in a package (bench/*.py, docker/*.py) as a module."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(extra: dict | None) -> dict:
    assert os.environ.get("NITRO_CACHE_DIR"), "tests/conftest.py sets NITRO_CACHE_DIR for the session"
    env = {**os.environ, **(extra or {})}
    # This checkout first on the child's path, so it imports the code under test wherever the editable install
    # of the environment points.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=_env(env))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`nitrofusion serve` as a real uvicorn process on a free loopback port."""

    def __init__(self, *args: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", str(self.port), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=_env(env),
        )

    def wait_ready(self, path: str = "/healthz", timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling for start-up, not a timing assertion
        raise TimeoutError(f"server not ready after {timeout}s")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A real CLI process failed the way users should see it: exit status 2, one line naming the problem."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "usage:", " "))]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def kill_after_checkpoint(args: list[str], state: Path, step: int = 2, timeout: float = 180) -> int:
    """Start a `nitrofusion train` process, SIGKILL its whole group once its stage checkpoint (`state`,
    checkpoint/state.json) reaches `step`, and return the step it had saved."""
    import json
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (state.is_file() and json.loads(state.read_text())["step"] >= step):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"no checkpoint within {timeout:.0f} s"
        time.sleep(0.2)  # polling for a file another process writes, not a timing assertion
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())["step"]
