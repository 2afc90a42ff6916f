"""The model runner: every tensor operation the engine does, on the engine thread, with one way to isolate
failures. A batched call that raises is retried job by job, so only the job that still fails is failed
(a bad prompt, a non-finite latent, a decoder error) and every other job in the batch carries on."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .backends.base import Backend, Pending
from .generation import Row, attach_conditioning, new_row, step_rows
from .sampler import LCMSampler

log = logging.getLogger(__name__)


def by_job(rows: list[Row]) -> dict[Any, list[Row]]:
    """Rows grouped by their job, in first-seen order."""
    groups: dict[Any, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.job, []).append(r)
    return groups


def run_isolated(rows: list[Row], fn: Callable[[list[Row]], None], what: str) -> dict[Any, Exception]:
    """Run `fn` on all rows at once; if it raises, run it on each job's rows alone. Returns {job: error} for
    the jobs that fail on their own (empty when the batched call worked)."""
    if not rows:
        return {}
    try:
        fn(rows)
        return {}
    except Exception as e:
        log.warning("batched %s failed (%s: %s); retrying job by job", what, type(e).__name__, e)
    failures: dict[Any, Exception] = {}
    for job, own in by_job(rows).items():
        try:
            fn(own)
        except Exception as e:
            failures[job] = e
    return failures


class ModelRunner:
    """Owns the backend and the sampler for the engine: start rows, step them, decode them."""

    def __init__(self, backend: Backend, sampler: LCMSampler, shift: int):
        self.backend, self.sampler, self.shift = backend, sampler, shift

    def start(self, jobs: list) -> dict[Any, Exception]:
        """New rows for each job (initial noise on the device), then one batched text encoding for all."""
        for job in jobs:
            job.rows = [new_row(r, self.sampler, self.backend, self.shift) for r in job.requests]
            for r in job.rows:
                r.job = job
        failures = run_isolated([r for j in jobs for r in j.rows], lambda rs: attach_conditioning(self.backend, rs),
                                "text encoding")
        return {job: RuntimeError(f"text encoding failed: {e}") for job, e in failures.items()}

    def step(self, rows: list[Row], bucket: int) -> tuple[dict[Any, Exception], FiniteCheck | None]:
        """One UNet call over `rows` padded to `bucket` (a retried job runs unpadded), then the sampler update.
        Returns the jobs that failed, and the check that each stepped row's new x0 is finite: on CUDA it lands
        later (no sync here, so the next step can be launched first); the engine fails the rows it flags."""
        failures = run_isolated(rows, lambda rs: step_rows(self.backend, self.sampler, rs,
                                                           pad_to=bucket if len(rs) == len(rows) else None),
                                "denoising step")
        out = {job: RuntimeError(f"denoising failed: {e}") for job, e in failures.items()}
        stepped = [r for r in rows if r.job not in out and r.x0 is not None]
        if not stepped:
            return out, None
        flags = torch.isfinite(torch.cat([r.x0 for r in stepped])).flatten(1).all(1)  # (B,) on the device
        return out, FiniteCheck(stepped, Pending(flags))

    def decode_async(self, rows: list[Row], preview: bool = False) -> tuple[list[Decode], dict[Any, Exception]]:
        """Launch one decode per (image size, decoder) group: final latents with each request's decoder, or
        (`preview`) the last x0 with the preview decoder. A launch that raises is retried job by job."""
        groups: dict[tuple, list[Row]] = {}
        for r in rows:
            groups.setdefault((r.size_key, "preview" if preview else r.request.decoder), []).append(r)
        launched: list[Decode] = []
        failures: dict[Any, Exception] = {}
        for (_, decoder), group in groups.items():
            def launch(rs: list[Row], decoder: str = decoder) -> None:
                latents = torch.cat([r.x0 if preview else r.latents for r in rs])
                launched.append(Decode(rs, self.backend.decode_async(latents, decoder, preview), preview,
                                       [r.step for r in rs]))

            for job, e in run_isolated(group, launch, "preview decode" if preview else "decode").items():
                failures[job] = RuntimeError(f"decoding failed: {e}")
        return launched, failures


@dataclass
class FiniteCheck:
    """Whether each stepped row's x0 is finite, on its way to the host."""

    rows: list[Row]
    flags: Pending

    def bad_jobs(self) -> dict[Any, Exception]:
        ok = self.flags.result().tolist()
        return {r.job: RuntimeError("numerical error: non-finite values in this request's latents")
                for r, good in zip(self.rows, ok) if not good}


@dataclass
class Decode:
    """One launched decode: its rows (in order) and their images on the way."""

    rows: list[Row]
    images: Pending
    preview: bool
    steps: list[int]  # each row's step when launched: the row moves on before its preview lands