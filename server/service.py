"""The bridge between async handlers and the engine thread: validation, submission, awaiting results,
cancelling on disconnect, and mapping engine errors to HTTP answers."""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from dataclasses import dataclass, replace

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

log = logging.getLogger("nitrofusion.server")


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
        auto = self.auto_steps(params, where)
        steps = auto[1] if auto else params.steps  # the engine picks the count when it accepts the job
        base = GenerationRequest(params.prompt, steps, seed, width, height, decoder=params.decoder)
        try:
            self.pipe.validate(base)
        except InvalidRequest as e:
            name = (field_names or {}).get(e.field, e.field)
            raise invalid(name, e.reason, getattr(base, e.field, None), where) from None
        return [replace(base, seed=seed + i) for i in range(n)]

    @staticmethod
    def auto_steps(params: ImageParams, where: str = "body") -> tuple[int, int] | None:
        """(min_steps, max_steps) for "steps": "auto", else None."""
        if params.steps != "auto":
            return None
        if params.min_steps > params.max_steps:
            raise invalid("min_steps", f"must be at most max_steps ({params.max_steps}), got {params.min_steps}",
                          params.min_steps, where)
        return params.min_steps, params.max_steps

    def submit(self, job: Job) -> Job:
        """Hand `job` to the engine; however it ends other than with images or a cancellation, one log line
        says which request and why (the engine only counts failures, and knows no request ids)."""
        self.engine.submit(job)
        job.future.add_done_callback(lambda future: _log_failure(job.id, future))
        return job

    async def run(self, requests: list[GenerationRequest], http_request: Request | None = None,
                  auto_steps: tuple[int, int] | None = None) -> tuple[list[np.ndarray], Job]:
        """Submit one job and wait for its images (and the job: its `steps` is what "auto" chose); a client that
        disconnects cancels it."""
        rid = http_request.scope.get("state", {}).get("request_id", "-") if http_request is not None else "-"
        job = self.submit(Job(requests, id=rid, auto_steps=auto_steps, reports_served=auto_steps is not None))
        watcher = asyncio.create_task(_cancel_on_disconnect(http_request, job)) if http_request else None
        try:
            # The engine enforces the deadline itself; this outer bound only guards against a stuck engine.
            return await asyncio.wait_for(follow(job), self.settings.request_timeout + 30), job
        except TimeoutError:
            job.cancel()
            log.error("request %s: the engine gave no answer within %g s", rid, self.settings.request_timeout + 30)
            raise RequestTimeout(f"not finished within {self.settings.request_timeout:g} s") from None
        except asyncio.CancelledError:
            job.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()

    def served(self, job: Job) -> None:
        """A job from `run` has its response ready (images encoded): see Engine.served."""
        self.engine.served(job)

    def stream(self, requests: list[GenerationRequest], on_progress, request_id: str = "-",
               auto_steps: tuple[int, int] | None = None) -> Job:
        """Submit a streaming job; `on_progress(Progress)` is called on the event loop thread."""
        loop = asyncio.get_running_loop()

        def forward(event: Progress) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(on_progress, event)

        return self.submit(Job(requests, stream=True, on_progress=forward, id=request_id, auto_steps=auto_steps))

    def retry_after_s(self) -> int:
        """Seconds a client should wait before retrying: about one batch-worth of the queue per second."""
        waiting = self.engine.queue_depth
        return max(1, math.ceil(waiting / self.settings.max_batch))


def follow(job: Job) -> asyncio.Future:
    """An asyncio future that follows `job.future`, one way. Not asyncio.wrap_future: cancelling its future
    (a client gone, a timeout, a sender done before the engine set the result) cancels the job's future too,
    which belongs to the engine thread; its next set_result then raises there and fails the whole iteration,
    other requests included. Jobs are cancelled with job.cancel(), which the engine answers itself."""
    loop = asyncio.get_running_loop()
    mirror = loop.create_future()

    def copy(source) -> None:  # on the event loop
        if mirror.done():
            return
        if source.cancelled():
            mirror.cancel()
        elif source.exception() is not None:
            mirror.set_exception(source.exception())
        else:
            mirror.set_result(source.result())

    def schedule(source) -> None:  # on the engine thread, or here when already done
        try:
            loop.call_soon_threadsafe(copy, source)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    job.future.add_done_callback(schedule)
    return mirror


def _log_failure(request_id: str, future) -> None:
    """Runs on the engine thread when a job's future resolves."""
    exc = None if future.cancelled() else future.exception()
    if exc is None or isinstance(exc, Cancelled):
        return
    level = logging.ERROR if isinstance(exc, GenerationFailed) else logging.WARNING  # timeouts, draining
    log.log(level, "request %s failed: %s: %s", request_id, type(exc).__name__, exc)


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
