"""The step-level batching engine: one thread owns the model and runs ONE UNet call per iteration over
every active row, each row at its own step of its own 1-4 step schedule.

Plain Python over the Backend interface, so it is testable with a fake backend. The server talks to it
through `submit(job)` (thread-safe), `job.future` (a concurrent.futures.Future) and `job.cancel()`.

One iteration: admit waiting jobs (batched text encoding) -> drop cancelled / timed-out rows -> pick the
rows of one image size (oldest first), pad to a bucket, one UNet call -> per-row sampler update -> preview
decode for streaming rows -> finished rows go to one batched VAE decode -> results handed back.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .backends.base import Backend
from .generation import GenerationRequest, Row, attach_conditioning, new_row, step_rows
from .sampler import LCMSampler

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The admission queue is at its bound: the caller should retry later (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new work (HTTP 503)."""


class RequestTimeout(Exception):
    """The job did not finish within the request timeout (HTTP 504)."""


class Cancelled(Exception):
    """The job was cancelled (its client went away, or a newer request replaced it)."""


class GenerationFailed(Exception):
    """This job failed (bad values, an exception in its own work); other jobs are unaffected."""


@dataclass
class EngineConfig:
    max_batch: int = 16
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16)
    max_queue: int = 256
    request_timeout_s: float = 120.0
    batch_wait_ms: float = 0.0  # an idle engine waits this long for company before its first step
    batching: bool = True  # False: one request at a time (for comparison)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if not self.buckets or any(b < 1 for b in self.buckets) or list(self.buckets) != sorted(set(self.buckets)):
            raise ValueError("buckets must be distinct positive batch sizes in increasing order, e.g. 1,2,4,8,16")
        if self.buckets[-1] < self.max_batch:
            raise ValueError(f"the largest bucket ({self.buckets[-1]}) must be at least max_batch ({self.max_batch})")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be greater than 0")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be greater than or equal to 0")

    def bucket_for(self, n: int) -> int:
        """The smallest declared bucket that holds n rows (the same list drives graphs / TRT profiles)."""
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"{n} rows exceed the largest bucket {self.buckets[-1]}")


@dataclass
class Progress:
    """One row finished one step. `image` is a preview (x0) or, on the last step, the final image."""

    index: int  # which of the job's images
    step: int  # 1-based
    steps: int
    seed: int
    image: np.ndarray  # (H, W, 3) uint8
    final: bool


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One client request: 1+ images of the same prompt/size/steps. Results arrive on `future`."""

    requests: list[GenerationRequest]
    stream: bool = False  # decode a preview after every step and report it through on_progress
    on_progress: Callable[[Progress], None] | None = None
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")
    future: Future = field(default_factory=Future)
    enqueued_at: float = 0.0  # set by Engine.submit from the engine's clock
    deadline: float = float("inf")
    cancelled: bool = False
    rows: list[Row] = field(default_factory=list)

    def cancel(self) -> None:
        """Thread-safe: the engine drops this job's rows at its next iteration."""
        self.cancelled = True

    @property
    def steps(self) -> int:
        return self.requests[0].steps


class EngineObserver:
    """Hooks for metrics; the default does nothing. The server plugs Prometheus in here."""

    def iteration(self, batch_size: int, bucket: int, seconds: float) -> None: ...
    def finished(self, job: Job, seconds: float, images: int) -> None: ...
    def rejected(self, reason: str) -> None: ...
    def cancelled(self, job: Job) -> None: ...
    def failed(self, job: Job, reason: str) -> None: ...


class Engine:
    def __init__(self, backend: Backend, sampler: LCMSampler, shift: int, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None, clock: Callable[[], float] = time.monotonic):
        self.backend, self.sampler, self.shift = backend, sampler, shift
        self.clock = clock  # injectable so tests control time instead of sleeping
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self._pending: deque[Job] = deque()
        self._active: list[Job] = []
        self._cv = threading.Condition()
        self._accepting = True
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- the caller's side (any thread) --------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="nitro-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._cv:
            if not self._accepting:
                self.observer.rejected("draining")
                raise EngineClosed("the server is shutting down and takes no new requests")
            if len(self._pending) >= self.config.max_queue:
                self.observer.rejected("queue_full")
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting)")
            job.enqueued_at = self.clock()
            job.deadline = job.enqueued_at + self.config.request_timeout_s
            self._pending.append(job)
            self._cv.notify_all()
        return job

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_rows(self) -> int:
        return sum(len(j.rows) for j in self._active)

    def stop_accepting(self) -> None:
        with self._cv:
            self._accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in flight (used to drain on shutdown)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._pending or self._active:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with `drain`, finish what is queued and in flight first (up to `timeout`)."""
        self.stop_accepting()
        if drain:
            self.wait_idle(timeout)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        # The loop has exited: whatever is left is answered, never silently dropped.
        for job in list(self._pending) + self._active:
            self._fail(job, EngineClosed("the server stopped before this request finished"))
        self._pending.clear()
        self._active.clear()

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and not self._pending and not self._active:
                    self._cv.wait()
                if self._stopped:
                    return
                self._wait_for_company()
                new = self._take_pending()
            try:
                self._iteration(new)
            except Exception as e:  # a bug in the loop itself must not strand every waiting client
                log.exception("engine iteration failed")
                for job in new + self._active:
                    self._fail(job, GenerationFailed(f"internal error: {e}"))
                self._active = [j for j in self._active if not j.future.done()]
            with self._cv:
                self._cv.notify_all()  # wake wait_idle()

    def _wait_for_company(self) -> None:
        """With batch_wait_ms, an idle engine gives more requests a moment to join the first step."""
        wait = self.config.batch_wait_ms / 1000
        if wait <= 0 or self._active or not self.config.batching:
            return
        until = self._pending[0].enqueued_at + wait
        while len(self._pending) < self.config.max_batch and not self._stopped:
            left = until - self.clock()
            if left <= 0:
                break
            self._cv.wait(left)

    def _take_pending(self) -> list[Job]:
        """Admit jobs while their rows fit in max_batch (one job at a time with batching off)."""
        taken: list[Job] = []
        room = self.config.max_batch - self.active_rows
        if not self.config.batching and self._active:
            return taken
        while self._pending:
            job = self._pending[0]
            if job.cancelled or self.clock() > job.deadline:
                self._pending.popleft()
                taken.append(job)  # answered in _iteration
                continue
            n = len(job.requests)
            if n > room and (taken or self._active):
                break
            self._pending.popleft()
            taken.append(job)
            room -= n
            if not self.config.batching:
                break
        return taken

    def _iteration(self, new: list[Job]) -> None:
        self._admit(new)
        self._drop_cancelled_and_expired()
        rows = self._pick_rows()
        if not rows:
            return
        self._step(rows)
        self._stream_previews(rows)
        self._finish_done()

    def _admit(self, jobs: list[Job]) -> None:
        fresh = []
        for job in jobs:
            if self._answer_if_stale(job):
                continue
            job.rows = [new_row(r, self.sampler, self.backend, self.shift) for r in job.requests]
            for r in job.rows:
                r.extras["job"] = job
            fresh.append(job)
        if not fresh:
            return
        try:
            attach_conditioning(self.backend, [r for j in fresh for r in j.rows])  # one batched encode
        except Exception:
            for job in fresh:  # isolate: encode each job alone so one bad prompt fails alone
                try:
                    attach_conditioning(self.backend, job.rows)
                except Exception as e:
                    self._fail(job, GenerationFailed(f"text encoding failed: {e}"))
        self._active.extend(j for j in fresh if not j.future.done())

    def _answer_if_stale(self, job: Job) -> bool:
        if job.cancelled:
            self.observer.cancelled(job)
            self._fail(job, Cancelled("cancelled"))
            return True
        if self.clock() > job.deadline:
            self._fail(job, RequestTimeout(f"not finished within {self.config.request_timeout_s:g} s"))
            return True
        return False

    def _drop_cancelled_and_expired(self) -> None:
        self._active = [j for j in self._active if not self._answer_if_stale(j)]

    def _pick_rows(self) -> list[Row]:
        """All unfinished rows of the oldest job's image size (rows of other sizes wait a step)."""
        live = [r for j in self._active for r in j.rows if not r.done]
        if not live:
            return []
        key = live[0].size_key
        return [r for r in live if r.size_key == key][: self.config.max_batch]

    def _step(self, rows: list[Row]) -> None:
        t0 = time.perf_counter()
        bucket = self.config.bucket_for(len(rows))
        try:
            step_rows(self.backend, self.sampler, rows, pad_to=bucket)
        except Exception:
            # Isolate: step each job's rows alone; only the job that still fails is failed.
            for job in {r.extras["job"]: None for r in rows}:
                own = [r for r in rows if r.extras["job"] is job]
                try:
                    step_rows(self.backend, self.sampler, own)
                except Exception as e:
                    self._fail(job, GenerationFailed(f"denoising failed: {e}"))
        self.observer.iteration(len(rows), bucket, time.perf_counter() - t0)
        for r in rows:
            job = r.extras["job"]
            if not job.future.done() and r.x0 is not None and not torch.isfinite(r.x0).all():
                self._fail(job, GenerationFailed("numerical error: non-finite values in this request's latents"))

    def _stream_previews(self, rows: list[Row]) -> None:
        streaming = [r for r in rows if r.extras["job"].stream and not r.done and not r.extras["job"].future.done()]
        if not streaming:
            return
        previews = self._decode_isolated(streaming, preview=True)
        for r, img in zip(streaming, previews):
            if img is not None:
                self._progress(r, img, final=False)

    def _finish_done(self) -> None:
        done_jobs = [j for j in self._active if not j.future.done() and all(r.done for r in j.rows)]
        rows = [r for j in done_jobs for r in j.rows]
        if rows:
            images = self._decode_isolated(rows, preview=False)
            for r, img in zip(rows, images):
                r.extras["image"] = img
            now = self.clock()
            for job in done_jobs:
                if job.future.done():
                    continue
                if job.stream:
                    for r in job.rows:
                        self._progress(r, r.extras["image"], final=True)
                job.future.set_result([r.extras["image"] for r in job.rows])
                self.observer.finished(job, now - job.enqueued_at, len(job.rows))
        self._active = [j for j in self._active if not j.future.done()]

    def _decode_isolated(self, rows: list[Row], preview: bool) -> list[np.ndarray | None]:
        """One batched decode per image size; if it raises, decode job by job and fail only the culprit."""
        decode = self.backend.preview if preview else self.backend.decode
        out: dict[int, np.ndarray | None] = {}
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(rows):
            by_size.setdefault(r.size_key, []).append(i)
        for idx in by_size.values():
            sources = [rows[i].x0 if preview else rows[i].latents for i in idx]
            try:
                images = decode(torch.cat(sources))
                out.update(zip(idx, images))
                continue
            except Exception:
                log.warning("batched %s decode failed; decoding job by job", "preview" if preview else "final")
            for job in {rows[i].extras["job"]: None for i in idx}:
                own = [i for i in idx if rows[i].extras["job"] is job]
                try:
                    out.update(zip(own, decode(torch.cat([sources[idx.index(i)] for i in own]))))
                except Exception as e:
                    self._fail(job, GenerationFailed(f"decoding failed: {e}"))
                    out.update((i, None) for i in own)
        return [out[i] for i in range(len(rows))]

    def _progress(self, row: Row, image: np.ndarray, final: bool) -> None:
        job = row.extras["job"]
        if job.on_progress is None or job.future.done():
            return
        event = Progress(job.rows.index(row), row.step, row.schedule.steps, row.request.seed, image, final)
        try:
            job.on_progress(event)
        except Exception:  # a broken listener must not stop the engine
            log.exception("progress callback of %s failed", job.id)

    def _fail(self, job: Job, exc: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(exc)
            if not isinstance(exc, Cancelled):
                self.observer.failed(job, type(exc).__name__)
