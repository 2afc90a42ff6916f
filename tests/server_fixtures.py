"""Servers for the server tests.

In-process (`in_process`): the real app — routes, middleware, auth, CORS, error mapping, the engine thread,
metrics — over tests/fakes.py's backend and the tiny model's own tokenizers and limits, driven by Starlette's
TestClient, which runs the lifespan (warm-up, engine start, drain) and speaks HTTP and websockets in-process.
Real processes (tests/helpers.py's ServerProcess, `LoggedServer` below) stay for what lives in uvicorn or on
the wire: slow clients, connection caps, log lines, SIGTERM, disconnects, websocket frames.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from starlette.testclient import TestClient

from nitrofusion.pipeline import Pipeline
from server.app import create_app
from server.settings import ServerSettings

from .fakes import FailingFakeBackend, FakeBackend
from .helpers import ServerProcess


class _AsServed:
    """What the app reads from a backend besides the Backend interface (/v1/models, the ready log line)."""

    name = "fake"
    device = "cpu"


class ServerFakeBackend(_AsServed, FakeBackend):
    pass


class ServerFailingBackend(_AsServed, FailingFakeBackend):
    pass


def fake_pipeline(pipelines, family: str = "sd", backend: FakeBackend | None = None) -> Pipeline:
    """The tiny model's tokenizers, sizes and sampler, with a fake backend doing the work."""
    real = pipelines[family]
    return Pipeline(real.model, backend or ServerFakeBackend(), real.sampler)


class FakeClock:
    """The engine's clock, moved by the test: request deadlines pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def in_process(pipe: Pipeline, clock=None, **settings) -> Iterator[TestClient]:
    """A TestClient on create_app(pipe) with these ServerSettings (warm-up off unless asked for).
    Server errors come back as 500 responses, as a client would see them, not as exceptions."""
    settings.setdefault("warmup", False)
    app = create_app(pipe, ServerSettings(**settings), clock=clock)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.02)  # polling a condition, not asserting a duration


def metric(url_or_client, name: str) -> float:
    """One sample from /metrics, by its full name (labels included), of a URL or an in-process client."""
    if isinstance(url_or_client, str):
        text = httpx.get(url_or_client + "/metrics").text
    else:
        text = url_or_client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


class LoggedServer(ServerProcess):
    """A real server whose output is collected while it runs, so a test can read its log lines."""

    def __init__(self, *args: str, env: dict | None = None):
        super().__init__(*args, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        return self.log()
