"""The engine's scheduling policy as plain Python: lists of stand-in jobs, numbers for time, no threads, no
tensors (nitrofusion/scheduler.py imports neither torch nor threading)."""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nitrofusion.scheduler import EngineClosed, EngineConfig, QueueFull, Scheduler, check_buckets, choose_bucket


@dataclass
class R:  # a row: where it is in its schedule, and its image size
    steps: int
    size_key: tuple[int, int] = (8, 8)
    step: int = 0

    @property
    def done(self) -> bool:
        return self.step >= self.steps


@dataclass(eq=False)
class J:  # a job: one request per image
    name: str
    images: int = 1
    steps: int = 1
    size: tuple[int, int] = (8, 8)
    cancelled: bool = False
    enqueued_at: float = 0.0
    deadline: float = float("inf")
    rows: list = field(default_factory=list)

    @property
    def requests(self) -> list:
        return [self.name] * self.images

    def start(self) -> J:  # what the runner does at admission
        self.rows = [R(self.steps, self.size) for _ in range(self.images)]
        return self


def names(jobs) -> list[str]:
    return [j.name for j in jobs]


def test_the_module_imports_neither_torch_nor_threading():
    import nitrofusion.scheduler as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "threading", "numpy", "time"}, imported


def test_admission_fills_max_batch_oldest_first_and_the_rest_waits():
    s = Scheduler(EngineConfig(max_batch=4, buckets=(1, 2, 4)))
    for j in (J("a", 2), J("b", 1), J("c", 2), J("d", 1)):
        s.add(j, now=0)
    adm = s.admit(now=1)
    assert names(adm.admitted) == ["a", "b"]  # c (2 rows) does not fit the one row left; d waits behind it
    assert names(s.waiting) == ["c", "d"] and names(s.active) == ["a", "b"] and s.active_rows == 3


def test_a_job_larger_than_max_batch_still_runs_when_nothing_else_does():
    s = Scheduler(EngineConfig(max_batch=2, buckets=(1, 2)))
    s.add(J("big", 3), now=0)
    assert names(s.admit(now=0).admitted) == ["big"]


def test_queue_bound_and_draining_refuse_new_work():
    s = Scheduler(EngineConfig(max_queue=2))
    s.add(J("a"), 0)
    s.add(J("b"), 0)
    with pytest.raises(QueueFull, match="2 requests waiting"):
        s.add(J("c"), 0)
    s.accepting = False
    s.admit(0)
    with pytest.raises(EngineClosed):
        s.add(J("d"), 0)


def test_deadlines_and_cancellation_while_waiting_and_while_running():
    s = Scheduler(EngineConfig(request_timeout_s=10, max_batch=1, buckets=(1,)))
    running, queued, gone = J("running", steps=4), J("queued"), J("gone")
    for j in (running, queued, gone):
        s.add(j, now=0)
    assert names(s.admit(now=1).admitted) == ["running"]
    running.start()
    gone.cancelled = True
    assert s.stale(now=5) == ([], [])
    cancelled, expired = s.stale(now=11)
    assert cancelled == [] and names(expired) == ["running"] and s.active == []
    adm = s.admit(now=11)
    assert names(adm.expired) == ["queued"] and names(adm.cancelled) == ["gone"] and adm.admitted == []
    assert s.idle


def test_rows_of_one_size_share_a_call_padded_to_the_declared_bucket():
    s = Scheduler(EngineConfig(max_batch=6, buckets=(1, 3, 6)))
    jobs = [J("a", 2, size=(8, 8)), J("b", 1, size=(16, 8)), J("c", 2, size=(8, 8))]
    for j in jobs:
        s.add(j, 0)
    for j in s.admit(0).admitted:
        j.start()
    rows, bucket = s.next_rows()
    assert len(rows) == 4 and {r.size_key for r in rows} == {(8, 8)} and bucket == 6
    for r in rows:
        r.step = 1
    assert names(s.complete()) == ["a", "c"]
    s.remove(s.complete())
    rows, bucket = s.next_rows()
    assert len(rows) == 1 and rows[0].size_key == (16, 8) and bucket == 1


def test_rows_at_different_steps_share_a_call_until_each_finishes():
    s = Scheduler(EngineConfig(max_batch=4, buckets=(1, 2, 4)))
    for k in (1, 2, 3, 4):
        s.add(J(str(k), steps=k), 0)
    for j in s.admit(0).admitted:
        j.start()
    sizes = []
    while (picked := s.next_rows())[0]:
        rows, bucket = picked
        sizes.append((len(rows), bucket))
        for r in rows:
            r.step += 1
        s.remove(s.complete())
    assert sizes == [(4, 4), (3, 4), (2, 2), (1, 1)]


def test_batching_off_admits_one_job_at_a_time():
    s = Scheduler(EngineConfig(batching=False))
    for n in "abc":
        s.add(J(n), 0)
    assert names(s.admit(0).admitted) == ["a"]
    assert s.admit(0).admitted == []  # a is still active
    s.remove(list(s.active))
    assert names(s.admit(0).admitted) == ["b"]


def test_waiting_for_company():
    s = Scheduler(EngineConfig(batch_wait_ms=50, max_batch=3, buckets=(1, 2, 4)))
    assert s.wait_for_company_until() is None  # nothing waiting
    s.add(J("a"), now=10.0)
    assert s.wait_for_company_until() == pytest.approx(10.05)
    s.add(J("b"), now=10.01)
    s.add(J("c"), now=10.02)
    assert s.wait_for_company_until() is None  # the batch is full: start now
    s.admit(10.03)
    s.add(J("d"), now=10.04)
    assert s.wait_for_company_until() is None  # busy already: no waiting


def test_bucket_helpers():
    assert [choose_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]
    with pytest.raises(ValueError):
        choose_bucket(0, (1, 2))
    for bad in ((), (2, 1), (1, 1), (0, 1)):
        with pytest.raises(ValueError, match="increasing order"):
            check_buckets(bad)
    assert EngineConfig(max_batch=6, buckets=(1, 3, 6)).bucket_for(4) == 6
