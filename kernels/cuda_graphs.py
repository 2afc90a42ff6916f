"""One CUDA graph per batch bucket (and input shape) around a function of batch-first tensors.

Eager SDXL UNet at batch 1 is bound by kernel launches (../shared/docs/performance-anchors.md: 54.9 ms
eager, 27.3 ms replayed). `GraphCache(fn, buckets)` pads a call's rows up to the smallest declared bucket
(repeating the last row, as the engine's step loop does), copies them into static input buffers, replays
the graph captured for that (bucket, shapes, dtypes) key, and returns the first n output rows (cloned:
the static outputs are overwritten by the next replay). A key whose capture fails runs eagerly from then
on, with one log line; calls with more rows than the largest bucket, or off CUDA, run eagerly too.

The capture step is pluggable so the bookkeeping (bucket choice, padding, slicing, fallback) is unit-tested
on the CPU with a fake graph; `CudaGraphCapturer` is the real one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# The bucket list is not declared here: the engine's (nitrofusion.scheduler.DEFAULT_BUCKETS, or the server's
# --buckets) is passed down by the torch backend, so padding and graph capture always agree.


Key = tuple[int, tuple[tuple[tuple[int, ...], torch.dtype, str], ...]]


def graph_key(bucket: int, inputs: Sequence[torch.Tensor]) -> Key:
    """A graph is valid for one bucket and one set of per-row shapes / dtypes / devices."""
    return bucket, tuple((tuple(t.shape[1:]), t.dtype, str(t.device)) for t in inputs)


class StaticBuffers:
    """Static input tensors of one graph, (bucket, ...) each; `load` fills them for n <= bucket rows."""

    def __init__(self, bucket: int, like: Sequence[torch.Tensor]):
        self.bucket = bucket
        self.tensors = [torch.empty((bucket, *t.shape[1:]), dtype=t.dtype, device=t.device) for t in like]

    def load(self, inputs: Sequence[torch.Tensor]) -> int:
        n = inputs[0].shape[0]
        if n > self.bucket or any(t.shape[0] != n for t in inputs) or len(inputs) != len(self.tensors):
            raise ValueError(f"{len(inputs)} inputs of {[t.shape[0] for t in inputs]} rows do not fit bucket "
                             f"{self.bucket} with {len(self.tensors)} inputs")
        for dst, src in zip(self.tensors, inputs):
            dst[:n].copy_(src)
            if n < self.bucket:  # padding rows repeat the last real row (finite, same shapes)
                dst[n:].copy_(src[n - 1 : n].expand(self.bucket - n, *src.shape[1:]))
        return n


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclass
class CapturedGraph:
    buffers: StaticBuffers
    outputs: tuple[torch.Tensor, ...]
    replay: Callable[[], None]
    replays: int = 0


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph capture: warm up on a side stream (Triton compiles, cuDNN picks algorithms),
    then capture into one memory pool shared by all graphs of this capturer (only one replays at a time), on
    this capturer's own capture stream.

    The own stream matters for graphs that replay at the same time (the decoder's on the decode stream, the
    UNet's on the main one): cuBLAS keeps one workspace per (handle, stream), and a graph bakes in the
    workspace of the stream it was captured on (pytorch/pytorch#193402: graphs captured on one stream share it
    even with separate pools). On torch's shared default capture stream every graph got the same workspace, so
    overlapped replays could race on it. It was taken for the cause of what an H200 showed on 2026-11-30 with torch
    2.11 (decode overlap changed 489 pixels of one image in ten by 1/255 with graphs on, nothing with graphs off;
    bench/overlap_determinism.py), but rerun on an H200 with this change (2026-12-04, BENCHMARKS.md round four) the
    same 489 pixels differ: the cause lies elsewhere in the graphed path, still to be found."""

    device_type = "cuda"

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.pool = None
        self.stream = None

    def __call__(self, fn: Callable[..., Any], buffers: StaticBuffers) -> tuple[tuple[torch.Tensor, ...], Callable]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
            self.stream = torch.cuda.Stream()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(*buffers.tensors)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = _as_tuple(fn(*buffers.tensors))
        return out, graph.replay


@dataclass
class GraphCache:
    """Replay `fn(*batch_first_tensors)` from a CUDA graph per (bucket, shapes). See the module docstring."""

    fn: Callable[..., Any]
    buckets: Sequence[int]
    name: str = "graph"
    capturer: Callable[[Callable[..., Any], StaticBuffers], tuple[tuple[torch.Tensor, ...], Callable]] | None = None
    enabled: bool = True
    graphs: dict[Key, CapturedGraph] = field(default_factory=dict)
    failed: dict[Key, str] = field(default_factory=dict)
    eager_calls: int = 0

    def __post_init__(self):
        self.buckets = tuple(int(b) for b in self.buckets)
        if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be distinct positive batch sizes in increasing order, got {self.buckets}")
        if self.capturer is None:
            self.capturer = CudaGraphCapturer()

    def _eager(self, inputs: Sequence[torch.Tensor]) -> Any:
        self.eager_calls += 1
        return self.fn(*inputs)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        n = inputs[0].shape[0]
        bucket = next((b for b in self.buckets if b >= n), None)  # the smallest that holds n rows
        device_type = getattr(self.capturer, "device_type", None)  # None: the capturer takes any device
        if not self.enabled or bucket is None or device_type not in (None, inputs[0].device.type):
            return self._eager(inputs)
        key = graph_key(bucket, inputs)
        if key in self.failed:
            return self._eager(inputs)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, bucket, inputs)
            if entry is None:
                return self._eager(inputs)
        entry.buffers.load(inputs)
        entry.replay()
        entry.replays += 1
        outs = tuple(o[:n].clone() for o in entry.outputs)
        return outs if len(outs) > 1 else outs[0]

    def _capture(self, key: Key, bucket: int, inputs: Sequence[torch.Tensor]) -> CapturedGraph | None:
        buffers = StaticBuffers(bucket, inputs)
        buffers.load(inputs)
        try:
            outputs, replay = self.capturer(self.fn, buffers)
        except Exception as e:  # noqa: BLE001 - any capture failure means: run this shape eagerly
            self.failed[key] = f"{type(e).__name__}: {e}"
            log.warning("%s: CUDA graph capture failed for bucket %d (%s); running it eagerly", self.name,
                        bucket, self.failed[key])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return None
        entry = CapturedGraph(buffers, outputs, replay)
        self.graphs[key] = entry
        return entry

    def summary(self) -> dict:
        return {"graphs": len(self.graphs), "failed": len(self.failed), "eager_calls": self.eager_calls,
                "replays": sum(g.replays for g in self.graphs.values())}
