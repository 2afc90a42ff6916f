"""The step-level batching engine: one thread owns the model and runs ONE UNet call per iteration over
every active row, each row at its own step of its own 1-4 step schedule.

Three parts, as nano-vllm splits its engine: the policy (nitrofusion/scheduler.py: admission, which rows share
a call, timeouts and cancellation, plain Python), the mechanism (nitrofusion/runner.py: every tensor operation,
with one failure-isolation helper), and this thin thread that joins them and answers the callers. The server
talks to it through `submit(job)` (thread-safe), `job.future` (a concurrent.futures.Future) and `job.cancel()`.

One iteration: admit waiting jobs (batched text encoding) -> drop cancelled / timed-out jobs -> one UNet call
over the rows of one image size, padded to a bucket -> sampler update -> previews for streaming rows ->
finished jobs decoded in one batch -> results handed back.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import numpy as np

from .backends.base import Backend
from .generation import GenerationRequest, Row
from .runner import Decode, FiniteCheck, ModelRunner
from .sampler import LCMSampler
from .scheduler import EngineClosed, EngineConfig, QueueFull, Scheduler
from .steps_policy import Choice, StepPolicy

__all__ = ["Cancelled", "Engine", "EngineClosed", "EngineConfig", "EngineObserver", "GenerationFailed", "Job",
           "Progress", "QueueFull", "RequestTimeout"]

log = logging.getLogger(__name__)


class RequestTimeout(Exception):
    """The job did not finish within the request timeout (HTTP 504)."""


class Cancelled(Exception):
    """The job was cancelled (its client went away, or a newer request replaced it)."""


class GenerationFailed(Exception):
    """This job failed (bad values, an exception in its own work); other jobs are unaffected."""


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
    rows: list[Row] = field(default_factory=list)  # made at admission (nitrofusion/runner.py)
    decoding: bool = False  # its final decode is launched: the scheduler does not hand it out again
    auto_steps: tuple[int, int] | None = None  # (min, max): the engine picks the steps when it accepts the job
    predicted_s: float | None = None  # for auto jobs: the latency the policy predicted (None: no estimate yet)
    # The caller tells the engine when its answer is out (Engine.served), so the policy's correction learns the
    # time to the response (image encoding, the event loop's turn) rather than to the image alone.
    reports_served: bool = False

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
        self.runner = ModelRunner(backend, sampler, shift)
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(self.config)
        self.policy = StepPolicy(None if self.config.latency_target_ms is None else self.config.latency_target_ms / 1000,
                                 self.config.max_batch, self.config.buckets)
        self.clock = clock  # injectable so tests control time instead of sleeping
        self.observer = observer or EngineObserver()
        self._cv = threading.Condition()  # guards the scheduler's waiting queue; wakes the engine thread
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._checks: list[FiniteCheck] = []  # x0 finiteness of launched steps, oldest first
        self._decodes: list[Decode] = []  # launched decodes not yet answered, oldest first

    @property
    def backend(self) -> Backend:
        return self.runner.backend

    # -- the caller's side (any thread) --------------------------------------------------------
    def start(self) -> Engine:
        self._thread = threading.Thread(target=self._loop, name="nitro-engine", daemon=True)
        self._thread.start()
        return self

    def submit(self, job: Job) -> Job:
        with self._cv:
            if job.auto_steps is not None:
                self._choose_steps(job)
            try:
                self.scheduler.add(job, self.clock())
            except EngineClosed:
                self.observer.rejected("draining")
                raise
            except QueueFull:
                self.observer.rejected("queue_full")
                raise
            self._cv.notify_all()
        return job

    def _choose_steps(self, job: Job) -> None:
        """"steps": "auto": the most steps predicted to meet the latency target behind the work held now."""
        rows, row_steps = self.scheduler.work_ahead()
        n = len(job.requests)
        choice = self.policy.choose(*job.auto_steps, rows, row_steps, images=n)
        target = self.policy.target_s
        if (target is not None and choice.predicted_s is not None and choice.predicted_s > target
                and self._level_waiting(choice.steps)):
            rows, row_steps = self.scheduler.work_ahead()
            choice = Choice(choice.steps, self.policy.predict(choice.steps, rows, row_steps, images=n))
        job.requests = [replace(r, steps=choice.steps) for r in job.requests]
        job.predicted_s = choice.predicted_s

    def _level_waiting(self, level: int) -> bool:
        """The queue is over-committed (a new auto request misses the target even at its fewest steps): auto
        requests still waiting with more than `level` steps come down to it (or to their own min_steps). Chosen
        one at a time, the first requests of a burst each took the most steps that fit them alone, and every later
        one waited behind that work: at concurrency 64 the last of the first wave took 1.7x the target at 1 step
        while the first 33 ran 4 (bundled model, this CPU). Started requests keep their schedules. Lowered ones
        get a new prediction (for the policy's error); True if any changed."""
        now = self.clock()
        rows, row_steps = self.scheduler.work_ahead(queued=False)  # then each waiting job's prefix, in queue order
        changed = False
        for j in self.scheduler.waiting:
            if j.auto_steps is not None and j.steps > max(level, j.auto_steps[0]):
                steps = max(level, j.auto_steps[0])
                j.requests = [replace(r, steps=steps) for r in j.requests]
                if j.predicted_s is not None:
                    left = self.policy.predict(steps, rows, row_steps, images=len(j.requests))
                    j.predicted_s = None if left is None else now - j.enqueued_at + left
                changed = True
            r, s = self.scheduler.work_of(j)
            rows, row_steps = rows + r, row_steps + s
        return changed

    def _recheck_steps(self, admitted: list[Job], now: float) -> None:
        """Auto jobs leaving the queue: fewer steps if their wait ran past what the policy foresaw (their rows
        are made after this, so the new count is the one they run and report)."""
        for job in admitted:
            if job.auto_steps is None or job.predicted_s is None:
                continue
            beside = self.scheduler.active_rows - len(job.requests)
            choice = self.policy.rechoose(job.steps, job.auto_steps[0], now - job.enqueued_at, beside,
                                          images=len(job.requests))
            if choice is not None:
                job.requests = [replace(r, steps=choice.steps) for r in job.requests]
                job.predicted_s = choice.predicted_s

    def served(self, job: Job) -> None:
        """The answer to `job` (made with `reports_served`) has left: for an auto job, the policy learns how far
        its prediction was from the time since admission. Thread-safe; the server calls it from the event loop."""
        if job.reports_served:
            with self._cv:
                self._score(job, self.clock())

    def _score(self, job: Job, now: float) -> None:
        """An auto job's prediction error, for the policy's correction (fixed jobs and unpredicted ones: none)."""
        if job.auto_steps is not None and job.predicted_s is not None:
            self.policy.observe_latency(job.predicted_s, now - job.enqueued_at)

    @property
    def queue_depth(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def active_rows(self) -> int:
        return self.scheduler.active_rows

    def stop_accepting(self) -> None:
        with self._cv:
            self.scheduler.accepting = False

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or in flight (used to drain on shutdown)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while not self.scheduler.idle:
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
        self._checks.clear()
        self._decodes.clear()
        for job in self.scheduler.drain_all():
            self._fail(job, EngineClosed("the server stopped before this request finished"))

    # -- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and self.scheduler.idle:
                    self._cv.wait()
                if self._stopped:
                    return
                self._wait_for_company()
                now = self.clock()
                admission = self.scheduler.admit(now)
                self._recheck_steps(admission.admitted, now)
            try:
                self._iteration(admission)
            except Exception as e:  # a bug in the loop itself must not strand every waiting client
                log.exception("engine iteration failed")
                for job in self.scheduler.active:
                    self._fail(job, GenerationFailed(f"internal error: {e}"))
                self.scheduler.remove(list(self.scheduler.active))
                self._checks.clear()
                self._decodes.clear()
            with self._cv:
                self._cv.notify_all()  # wake wait_idle()

    def _wait_for_company(self) -> None:
        """With batch_wait_ms, an idle engine gives more requests a moment to join the first step."""
        while not self._stopped and (until := self.scheduler.wait_for_company_until()) is not None:
            left = until - self.clock()
            if left <= 0:
                break
            self._cv.wait(left)

    def _iteration(self, admission) -> None:
        started = time.perf_counter()
        # 1. answer jobs that went stale while they waited; start the rest (noise, batched text encoding)
        for job in admission.cancelled:
            self._cancelled(job)
        for job in admission.expired:
            self._timed_out(job)
        if admission.admitted:
            self._fail_all(self.runner.start(admission.admitted))
        # 2. jobs cancelled or past their deadline leave before the next call
        cancelled, expired = self.scheduler.stale(self.clock())
        for job in cancelled:
            self._cancelled(job)
        for job in expired:
            self._timed_out(job)
        # 3. one UNet call over the rows of one size, padded to a declared bucket (launched, not waited for)
        rows, bucket = self.scheduler.next_rows()
        if rows:
            t0 = time.perf_counter()
            failures, check = self.runner.step(rows, bucket)
            self._fail_all(failures)
            if check is not None:
                self._checks.append(check)
            # At most one step queued ahead of the device: wait for the previous step while this one runs, so the
            # thread's admission, cancellation and timing follow the GPU instead of racing ahead of it.
            while len(self._checks) > 1:
                self._fail_all(self._checks.pop(0).bad_jobs())
            seconds = time.perf_counter() - t0  # on CUDA this includes waiting for the previous step (see above)
            self.observer.iteration(len(rows), bucket, seconds)
        # 4. previews for streaming rows still on their way; finished jobs decoded in one batch. On CUDA both run
        #    on the decode stream while the next iteration's UNet step runs.
        streaming = [r for r in rows if r.job.stream and not r.done and not r.job.future.done()]
        if streaming:
            self._launch_decodes(streaming, preview=True)
        done = self.scheduler.complete()
        if done:
            for job in done:
                job.decoding = True
            self._launch_decodes([r for j in done for r in j.rows], preview=False)
        # 5. answer what has landed; wait for the rest when there is no further step to overlap with
        self._deliver(wait=not self.scheduler.next_rows()[0])
        if rows:
            # The "auto" policy learns the whole iteration, not the UNet call alone: a request queued behind W
            # iterations waits for their text encodes and decodes too. Fed the UNet time, the policy fell short by
            # a share of every iteration ahead, an error that grows with the queue, which its additive correction
            # (learned at shallower queues) could not follow: at concurrency 64 the first 64 requests all got 4
            # steps against a 500 ms target and the last of them took 674 ms (bundled model, this CPU).
            self.policy.observe_iteration(bucket, time.perf_counter() - started)

    def _launch_decodes(self, rows: list[Row], preview: bool) -> None:
        t0 = time.perf_counter()
        launched, failures = self.runner.decode_async(rows, preview=preview)
        if not preview:  # the whole decode on the CPU; on CUDA its cost shows in the following steps' times
            self.policy.observe_decode(len(rows), time.perf_counter() - t0)
        self._fail_all(failures)
        self._decodes.extend(launched)

    def _deliver(self, wait: bool) -> None:
        """Fail the rows whose x0 came back non-finite, then hand out landed decodes in launch order (one decode
        stream: they land in that order). A decode launched after a check implies that check has landed."""
        while self._checks and (wait or self._checks[0].flags.ready()):
            self._fail_all(self._checks.pop(0).bad_jobs())
        while self._decodes and (wait or self._decodes[0].images.ready()):
            decode = self._decodes.pop(0)
            while self._checks and self._checks[0].flags.ready():
                self._fail_all(self._checks.pop(0).bad_jobs())
            try:
                images = decode.images.result().numpy()
            except Exception as e:  # a device error surfaces at the sync: the jobs of this decode fail
                self._fail_all({r.job: RuntimeError(f"decoding failed: {e}") for r in decode.rows})
                continue
            for r, img, step in zip(decode.rows, images, decode.steps):
                if decode.preview:
                    if not r.job.future.done():
                        self._progress(r, img, final=False, step=step)
                else:
                    r.image = img
            if not decode.preview:
                self._answer([j for j in dict.fromkeys(r.job for r in decode.rows)
                              if all(x.image is not None for x in j.rows)])

    def _answer(self, jobs: list[Job]) -> None:
        now = self.clock()
        for job in jobs:
            if not job.future.done():
                if job.stream:
                    for r in job.rows:
                        self._progress(r, r.image, final=True)
                # Scored and counted before the answer goes out, so whoever waits on the future finds the policy
                # and the metrics updated.
                if not job.reports_served:
                    self._score(job, now)
                self.observer.finished(job, now - job.enqueued_at, len(job.rows))
                job.future.set_result([r.image for r in job.rows])
        self.scheduler.remove(jobs)

    def _progress(self, row: Row, image: np.ndarray, final: bool, step: int | None = None) -> None:
        job = row.job
        if job.on_progress is None or job.future.done():
            return
        step = row.step if step is None else step
        event = Progress(job.rows.index(row), step, row.schedule.steps, row.request.seed, image, final)
        try:
            job.on_progress(event)
        except Exception:  # a broken listener must not stop the engine
            log.exception("progress callback of %s failed", job.id)

    def _cancelled(self, job: Job) -> None:
        self.observer.cancelled(job)
        self._fail(job, Cancelled("cancelled"))

    def _timed_out(self, job: Job) -> None:
        self._fail(job, RequestTimeout(f"not finished within {self.config.request_timeout_s:g} s"))

    def _fail_all(self, failures: dict) -> None:
        """Fail each job with its own cause and take it out of the active set; the others carry on."""
        for job, e in failures.items():
            self._fail(job, GenerationFailed(str(e)))
        if failures:
            self.scheduler.remove(list(failures))

    def _fail(self, job: Job, exc: Exception) -> None:
        if not job.future.done():
            job.future.set_exception(exc)
            if not isinstance(exc, Cancelled):
                self.observer.failed(job, type(exc).__name__)
