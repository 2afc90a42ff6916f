"""Scheduling policy of the step-level engine, as plain Python: no torch, no threads, no clock of its own.

The engine thread asks it, once per iteration, which waiting jobs to admit, which jobs to answer because
they were cancelled or ran past their deadline, which rows share the next UNet call and which bucket that
call is padded to, and which jobs are complete. Everything is decided from the arguments (the time `now`
included), so it is unit-tested with lists and numbers (tests/test_scheduler.py).

A job is anything with `requests` (one per image), `rows` (objects with `done` and `size_key`), `cancelled`,
`enqueued_at` and `deadline`: nitrofusion.engine.Job.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

# The batch sizes a UNet call is padded to, declared once: the server's settings pass them down to the
# engine's padding, the torch backend's CUDA-graph capture and warm-up, and the TensorRT engine profiles.
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


class QueueFull(Exception):
    """The admission queue is at its bound: the caller should retry later (HTTP 429)."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new work (HTTP 503)."""


def check_buckets(buckets) -> tuple[int, ...]:
    b = tuple(int(x) for x in buckets)
    if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
        raise ValueError("buckets must be distinct positive batch sizes in increasing order, e.g. 1,2,4,8,16")
    return b


def choose_bucket(n: int, buckets) -> int | None:
    """The smallest bucket that holds n rows, or None when n exceeds the largest."""
    if n < 1:
        raise ValueError(f"need at least one row, got {n}")
    return next((b for b in buckets if b >= n), None)


@dataclass
class EngineConfig:
    max_batch: int = 16
    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_queue: int = 256
    request_timeout_s: float = 120.0
    batch_wait_ms: float = 0.0  # an idle engine waits this long for company before its first step
    batching: bool = True  # False: one request at a time (for comparison)
    latency_target_ms: float | None = None  # what "steps": "auto" aims for (nitrofusion/steps_policy.py)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.buckets = check_buckets(self.buckets)
        if self.buckets[-1] < self.max_batch:
            raise ValueError(f"the largest bucket ({self.buckets[-1]}) must be at least max_batch ({self.max_batch})")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be greater than 0")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms must be greater than or equal to 0")
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise ValueError("latency_target_ms must be greater than 0 (or unset: auto steps mean max_steps)")

    def bucket_for(self, n: int) -> int:
        """The smallest declared bucket that holds n rows (the same list drives graphs / TRT profiles)."""
        bucket = choose_bucket(n, self.buckets)
        if bucket is None:
            raise ValueError(f"{n} rows exceed the largest bucket {self.buckets[-1]}")
        return bucket


@dataclass
class Admission:
    """What one call to `Scheduler.admit` decided."""

    admitted: list  # jobs whose rows join the active set now
    cancelled: list  # jobs cancelled while they waited: answer them, spend nothing
    expired: list  # jobs whose deadline passed while they waited


class Scheduler:
    """The waiting queue and the active jobs; the engine holds its lock around every call."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.waiting: deque = deque()
        self.active: list = []
        self.accepting = True

    # -- admission ------------------------------------------------------------------------------
    def add(self, job: Any, now: float) -> None:
        """Queue a job or refuse it (EngineClosed while draining, QueueFull at the bound)."""
        if not self.accepting:
            raise EngineClosed("the server is shutting down and takes no new requests")
        if len(self.waiting) >= self.config.max_queue:
            raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting)")
        job.enqueued_at = now
        job.deadline = now + self.config.request_timeout_s
        self.waiting.append(job)

    @property
    def active_rows(self) -> int:
        return sum(len(j.requests) for j in self.active)

    @staticmethod
    def work_of(job: Any) -> tuple[int, int]:
        """(rows, UNet row-steps) a job still needs: what is left of its rows once started, else all of it."""
        if job.rows:
            left = [r.schedule.steps - r.step for r in job.rows if not r.done]
            return len(left), sum(left)
        n = len(job.requests)
        return n, n * job.requests[0].steps

    def work_ahead(self, queued: bool = True) -> tuple[int, int]:
        """(rows, UNet row-steps) in flight and (with `queued`) waiting: what a newly accepted request waits
        behind."""
        rows = steps = 0
        for job in list(self.active) + (list(self.waiting) if queued else []):
            r, s = self.work_of(job)
            rows, steps = rows + r, steps + s
        return rows, steps

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    def wait_for_company_until(self) -> float | None:
        """With batch_wait_ms, an idle engine gives more requests a moment to join its first step: the time to
        wait until, or None to start now (busy already, batching off, or the batch is full)."""
        wait = self.config.batch_wait_ms / 1000
        if (wait <= 0 or self.active or not self.config.batching or not self.waiting
                or len(self.waiting) >= self.config.max_batch):
            return None
        return self.waiting[0].enqueued_at + wait

    def admit(self, now: float) -> Admission:
        """Take waiting jobs, oldest first, while their rows fit in max_batch next to the active rows (one job
        at a time with batching off). A job larger than the free room is still taken when nothing else runs,
        so a big job cannot wait forever. Stale jobs at the head are taken off to be answered. Admitted jobs join
        the active set at once (under the engine's lock), so a job is never in neither set while the engine
        prepares its rows, and a drain waiting for idle cannot miss it."""
        out = Admission([], [], [])
        if not self.config.batching and self.active:
            return out
        room = self.config.max_batch - self.active_rows
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled or now > job.deadline:
                self.waiting.popleft()
                (out.cancelled if job.cancelled else out.expired).append(job)
                continue
            n = len(job.requests)
            if n > room and (out.admitted or self.active):
                break
            self.waiting.popleft()
            out.admitted.append(job)
            room -= n
            if not self.config.batching:
                break
        self.active.extend(out.admitted)
        return out

    # -- per iteration --------------------------------------------------------------------------
    def stale(self, now: float) -> tuple[list, list]:
        """(cancelled, expired) active jobs, removed from the active set: their rows leave the next call."""
        cancelled = [j for j in self.active if j.cancelled]
        expired = [j for j in self.active if not j.cancelled and now > j.deadline]
        if cancelled or expired:
            gone = {id(j) for j in cancelled + expired}
            self.active = [j for j in self.active if id(j) not in gone]
        return cancelled, expired

    def next_rows(self) -> tuple[list, int]:
        """(rows, bucket) for the next UNet call: every unfinished row of the oldest job's image size, up to
        max_batch (rows of other sizes wait a step), and the declared bucket they are padded to."""
        live = [r for j in self.active for r in j.rows if not r.done]
        if not live:
            return [], 0
        key = live[0].size_key
        rows = [r for r in live if r.size_key == key][: self.config.max_batch]
        return rows, self.config.bucket_for(len(rows))

    def complete(self) -> list:
        """Active jobs whose rows have all finished their schedules and whose decode is not launched yet."""
        return [j for j in self.active if all(r.done for r in j.rows) and not getattr(j, "decoding", False)]

    def remove(self, jobs: list) -> None:
        gone = {id(j) for j in jobs}
        self.active = [j for j in self.active if id(j) not in gone]

    def drain_all(self) -> list:
        """Every job still held (waiting or active), removed: the engine answers them when it stops."""
        jobs = list(self.waiting) + self.active
        self.waiting.clear()
        self.active = []
        return jobs
