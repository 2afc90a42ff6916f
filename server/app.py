"""The FastAPI application: wiring of settings, engine, routes, middleware and shutdown behaviour.

The model is loaded before the port opens (load errors are CLI errors); the engine thread owns it; the
lifespan warms it up before /readyz turns ready, and drains it on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse

from nitrofusion.engine import Cancelled, Engine, EngineClosed, GenerationFailed, QueueFull, RequestTimeout
from nitrofusion.pipeline import Pipeline, load_pipeline

from . import routes, ws
from .errors import validation_error
from .metrics import PrometheusObserver
from .middleware import GuardMiddleware
from .net import bounded_protocol, redact_uvicorn_logs
from .service import GenerationService, error_response
from .settings import ServerSettings

log = logging.getLogger("nitrofusion.server")
PAGE = Path(__file__).parent / "static" / "index.html"


def create_app(pipe: Pipeline, settings: ServerSettings, clock: Callable[[], float] | None = None) -> FastAPI:
    """The app over `pipe`: any backend (tests pass tests/fakes.py's) and, for tests, the engine's clock."""
    if tuple(pipe.buckets) != tuple(settings.buckets):
        # One bucket list drives the engine's padding, the CUDA graphs and the TensorRT profiles: a pipeline
        # loaded for other buckets would replay nothing and run eagerly (or job by job) without a word.
        raise ValueError(f"the pipeline was loaded for buckets {pipe.buckets} but the settings say {settings.buckets}: "
                         "pass settings.buckets to load_pipeline")
    metrics = PrometheusObserver()
    engine = Engine(pipe.backend, pipe.sampler, pipe.shift, settings.engine_config(), observer=metrics,
                    clock=clock or time.monotonic)
    metrics.bind(engine)
    service = GenerationService(pipe, engine, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.warmup:
            await _warm_up(pipe, settings.warmup_sizes)  # before the engine thread: nobody else touches the model
        engine.start()
        app.state.ready = True
        log.info("ready: %s (%s, shift %d) on %s", pipe.model.name, pipe.model.family, pipe.shift,
                 pipe.backend.device)
        yield
        app.state.draining = True
        await asyncio.to_thread(engine.stop, True, settings.drain_timeout)

    # redirect_slashes off: Starlette builds the redirect from the client's Host header, so /generate/ would
    # send the client wherever that header said; a 404 is the honest answer.
    app = FastAPI(title="NitroFusion", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="Real-time 1-4 step text-to-image generation.")
    app.state.settings, app.state.service, app.state.metrics = settings, service, metrics
    app.state.engine = engine
    app.state.ready = False
    app.state.draining = False
    app.include_router(routes.router)
    app.include_router(ws.router)
    page = PAGE.read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return page

    for exc_type in (QueueFull, EngineClosed, RequestTimeout, Cancelled, GenerationFailed):
        app.add_exception_handler(exc_type, lambda request, exc: error_response(exc, service))

    app.add_exception_handler(RequestValidationError, validation_error)
    # Unexpected exceptions are answered (500, with the request id) and logged by GuardMiddleware.
    app.add_middleware(GuardMiddleware, api_keys=settings.api_keys, max_body_bytes=settings.max_body_bytes,
                       body_timeout=settings.body_timeout, max_header_bytes=settings.max_header_bytes)
    if settings.cors_origins:
        # Added last, so outermost: a preflight (no credentials, by design) is answered before the key check,
        # and 401s, 413s and 500s carry CORS headers too so that the page can read them.
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
                           expose_headers=["X-Request-ID", "X-Seed", "Retry-After"])
    return app


async def _warm_up(pipe: Pipeline, sizes: tuple[tuple[int, int], ...] = ()) -> None:
    """First-call costs are paid before /readyz turns ready: one 1-step image at the native size (or each of
    `sizes`), or, with CUDA graphs on, a capture for every batch bucket the engine pads to (Pipeline.warm_up)."""
    await asyncio.to_thread(pipe.warm_up, list(sizes) or None)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM means: readyz 503, refuse new work, finish in-flight work, exit 0.

    Plain uvicorn closes the listening socket at once and re-raises SIGTERM after shutting down, so the
    process ends 'killed by signal'. A second signal still forces the usual immediate shutdown."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_timeout: float):
        super().__init__(config)
        self.fastapi_app, self.drain_timeout = app, drain_timeout
        self._draining = False

    def handle_exit(self, sig: int, frame) -> None:
        if sig != signal.SIGTERM or self._draining:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        state = self.fastapi_app.state
        state.draining = True
        state.engine.stop_accepting()
        log.info("SIGTERM: draining in-flight work (up to %.0f s)", self.drain_timeout)

        def drain_then_exit() -> None:
            state.engine.wait_idle(self.drain_timeout)
            self.should_exit = True

        threading.Thread(target=drain_then_exit, name="nitro-drain", daemon=True).start()


def run_server(settings: ServerSettings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    from export.builder import ExportBuilder  # build on first use (ONNX on the CPU, TensorRT engines)

    pipe = load_pipeline(settings.model, settings.unet, settings.shift, settings.device, settings.dtype,
                         backend=settings.backend, buckets=settings.buckets, builder=ExportBuilder(),
                         config=settings.config)
    app = create_app(pipe, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.drain_timeout + 5,
                            ws_max_size=settings.ws_max_message_bytes, access_log=False,
                            http=bounded_protocol(settings.header_timeout),
                            limit_concurrency=settings.max_connections,
                            h11_max_incomplete_event_size=settings.max_header_bytes)
    redact_uvicorn_logs()  # after Config, which configures uvicorn's loggers
    DrainingServer(config, app, settings.drain_timeout).run()
