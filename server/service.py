"""The bridge between async handlers and the engine thread: validation, submission, awaiting results,
cancelling on disconnect, and mapping engine errors to HTTP answers."""

from __future__ import annotations

import asyncio
import math
import secrets
from dataclasses import dataclass

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from nitrofusion.engine import (
    Cancelled,
    Engine,
    EngineClosed,
    GenerationFailed,
    Job,
    Progress,
    QueueFull,
    RequestTimeout,
)
from nitrofusion.errors import InvalidRequest
from nitrofusion.generation import GenerationRequest
from nitrofusion.limits import MAX_SEED
from nitrofusion.pipeline import Pipeline

from .schemas import ImageParams
from .settings import ServerSettings


def invalid(field: str, reason: str, value: object = None, where: str = "body") -> RequestValidationError:
    """A 422 in FastAPI's own shape, for checks that need the loaded model."""
    return RequestValidationError([{"type": "value_error", "loc": (where, field), "msg": reason, "input": value}])


@dataclass
class GenerationService:
    pipe: Pipeline
    engine: Engine
    settings: ServerSettings

    def requests_for(self, params: ImageParams, n: int = 1, where: str = "body",
                     field_names: dict[str, str] | None = None) -> list[GenerationRequest]:
        """Resolve defaults (native size, random seed) and check the model-dependent limits."""
        native = self.pipe.model.native_size
        seed = secrets.randbits(62) if params.seed is None else params.seed
        if seed + n - 1 > MAX_SEED:
            raise invalid("seed", f"seed + images - 1 must be at most {MAX_SEED}", seed, where)
        width = native if params.width is None else params.width  # 0 is a bad width, not "use the default"
        height = native if params.height is None else params.height
        base = GenerationRequest(params.prompt, params.steps, seed, width, height)
        try:
            self.pipe.validate(base)
        except InvalidRequest as e:
            name = (field_names or {}).get(e.field, e.field)
            raise invalid(name, e.reason, getattr(base, e.field, None), where) from None
        return [GenerationRequest(base.prompt, base.steps, seed + i, base.width, base.height) for i in range(n)]

    async def run(self, requests: list[GenerationRequest], http_request: Request | None = None) -> list[np.ndarray]:
        """Submit one job and wait for its images; a client that disconnects cancels it."""
        job = self.engine.submit(Job(requests))
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, job)) if http_request else None
        try:
            # The engine enforces the deadline itself; this outer bound only guards against a stuck engine.
            return await asyncio.wait_for(asyncio.wrap_future(job.future), self.settings.request_timeout + 30)
        except TimeoutError:
            job.cancel()
            raise RequestTimeout(f"not finished within {self.settings.request_timeout:g} s") from None
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def stream(self, requests: list[GenerationRequest], on_progress) -> Job:
        """Submit a streaming job; `on_progress(Progress)` is called on the event loop thread."""
        loop = asyncio.get_running_loop()

        def forward(event: Progress) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(on_progress, event)

        return self.engine.submit(Job(requests, stream=True, on_progress=forward))

    def retry_after_s(self) -> int:
        """Seconds a client should wait before retrying: about one batch-worth of the queue per second."""
        waiting = self.engine.queue_depth
        return max(1, math.ceil(waiting / self.settings.max_batch))


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    # After FastAPI has read the body, the next ASGI message is http.disconnect when the client leaves.
    while not job.future.done():
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


def error_response(exc: Exception, service: GenerationService | None) -> JSONResponse | None:
    """HTTP answers for the engine's exceptions (None: not an engine error)."""
    if isinstance(exc, QueueFull):
        retry = service.retry_after_s() if service else 1
        return JSONResponse({"detail": str(exc)}, 429, headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineClosed):
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "5"})
    if isinstance(exc, RequestTimeout):
        return JSONResponse({"detail": f"request timed out: {exc}"}, 504)
    if isinstance(exc, Cancelled):
        return JSONResponse({"detail": "cancelled"}, 499)
    if isinstance(exc, GenerationFailed):
        return JSONResponse({"detail": f"generation failed: {exc}"}, 500)
    return None
