"""Steps chosen by load: for a request that asks for `"steps": "auto"`, the most steps (between its min and max)
whose predicted time from admission to image meets the server's latency target.

NitroFusion's one set of weights makes 1 to 4 steps a quality / speed dial. Under a burst a fixed 4-step
request costs four UNet passes while the queue grows; an "auto" request takes fewer when the engine is busy.
Plain Python over numbers (no torch, no threads, no clock of its own): the engine feeds it the iteration times
it measures and the work it holds, and asks it once per auto request, when the request is accepted.

The prediction: the engine runs one UNet call per iteration over up to `max_batch` rows, so a new row waits
behind the row-steps already queued or in flight (about ceil(ahead / max_batch) iterations when the batch is
full, none when it has room), then needs k iterations of its own, plus the final decode. An iteration's time is
a moving average per batch bucket of what the engine measured (`observe_iteration`: the whole iteration, so
the text encodes and decodes of the work ahead count), decodes likewise per
batch size. With no measurement yet for a bucket, the nearest measured bucket stands in, scaled by size; with
none at all, the policy cannot predict and picks `max_steps` (an idle server learns from its first request).
When the request leaves the queue, `rechoose` lowers its steps if its measured wait left too little time; and
the engine levels an over-committed queue (`Engine._level_waiting`).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class MovingAverage:
    """Exponentially weighted: recent measurements count most, so the estimate follows load and clocks."""

    alpha: float = 0.2
    value: float | None = None
    count: int = 0

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x
        self.count += 1


@dataclass
class Choice:
    steps: int
    predicted_s: float | None  # None: nothing measured yet to predict from


@dataclass
class StepPolicy:
    target_s: float | None  # latency target, seconds from admission to image; None: "auto" means max_steps
    max_batch: int
    buckets: tuple[int, ...]
    alpha: float = 0.2
    iteration_s: dict[int, MovingAverage] = field(default_factory=dict)  # per bucket
    decode_s: dict[int, MovingAverage] = field(default_factory=dict)  # per decoded batch size
    # Actual minus predicted latency of the last `error_window` finished auto requests: what the model above
    # misses (requests of other sizes in between, text encoding, the event loop) is added back to every
    # prediction, at this quantile of those errors. The goal is about the tail (p99 within 1.5x the target), and
    # aiming the mean error at the target left p99 at 1.59-2.7x on the 2-core CPU (BENCHMARKS.md); 0.5 aims the
    # median, as the earlier moving average of the errors roughly did.
    error_quantile: float = 0.9
    error_window: int = 200
    errors_s: deque = field(init=False, repr=False)  # made in __post_init__, bounded by error_window

    def __post_init__(self) -> None:
        if self.target_s is not None and self.target_s <= 0:
            raise ValueError("the latency target must be greater than 0 ms")
        if not 0 <= self.error_quantile <= 1:
            raise ValueError("the error quantile must be in [0, 1]")
        if self.error_window < 1:
            raise ValueError("the error window must hold at least one request")
        self.errors_s = deque(maxlen=self.error_window)

    # -- what the engine measured ------------------------------------------------------------------
    def observe_iteration(self, bucket: int, seconds: float) -> None:
        self.iteration_s.setdefault(bucket, MovingAverage(self.alpha)).add(seconds)

    def observe_decode(self, images: int, seconds: float) -> None:
        self.decode_s.setdefault(images, MovingAverage(self.alpha)).add(seconds)

    def observe_latency(self, predicted_s: float, actual_s: float) -> None:
        """A finished auto request: how far off its prediction was (feeds the correction in `predict`)."""
        self.errors_s.append(actual_s - predicted_s)

    def correction_s(self) -> float:
        """The `error_quantile` of the recent prediction errors (0 before any): added to every prediction."""
        if not self.errors_s:
            return 0.0
        ordered = sorted(self.errors_s)
        return ordered[min(len(ordered) - 1, int(self.error_quantile * len(ordered)))]

    # -- estimates ---------------------------------------------------------------------------------
    @staticmethod
    def _estimate(table: dict[int, MovingAverage], key: int) -> float | None:
        """The measured average for `key`, else the nearest measured key's, scaled linearly by key (a bigger
        batch costs more, a smaller one less: a rough stand-in until `key` itself is measured)."""
        known = {k: m.value for k, m in table.items() if m.value is not None}
        if not known:
            return None
        if key in known:
            return known[key]
        nearest = min(known, key=lambda k: (abs(k - key), k))
        return known[nearest] * key / nearest

    def _bucket(self, rows: int) -> int:
        rows = max(1, min(rows, self.max_batch))
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    def predict(self, steps: int, rows_ahead: int, row_steps_ahead: int, images: int = 1) -> float | None:
        """Seconds from now until an `images`-row request of `steps` steps is decoded, with `rows_ahead` rows
        holding `row_steps_ahead` UNet row-steps queued or in flight before it."""
        batch = min(self.max_batch, rows_ahead + images)
        per_iteration = self._estimate(self.iteration_s, self._bucket(batch))
        if per_iteration is None:
            return None
        # With room in the batch the new rows join the next iteration; past max_batch they wait their turn.
        overflow = max(0, rows_ahead + images - self.max_batch)
        wait_iterations = math.ceil(row_steps_ahead * overflow / max(1, rows_ahead) / self.max_batch) \
            if overflow else 0
        decode = self._estimate(self.decode_s, images) or 0.0
        return max(0.0, (wait_iterations + steps) * per_iteration + decode + self.correction_s())

    def choose(self, min_steps: int, max_steps: int, rows_ahead: int, row_steps_ahead: int,
               images: int = 1) -> Choice:
        """The most steps in [min_steps, max_steps] predicted to meet the target; min_steps when none does
        (the request still runs: the queue bound, not this policy, refuses work)."""
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
        if self.target_s is None:
            return Choice(max_steps, self.predict(max_steps, rows_ahead, row_steps_ahead, images))
        for steps in range(max_steps, min_steps - 1, -1):
            predicted = self.predict(steps, rows_ahead, row_steps_ahead, images)
            if predicted is None:
                return Choice(max_steps, None)
            if predicted <= self.target_s:
                return Choice(steps, predicted)
        return Choice(min_steps, self.predict(min_steps, rows_ahead, row_steps_ahead, images))

    def rechoose(self, chosen: int, min_steps: int, waited_s: float, rows_beside: int, images: int = 1) -> Choice | None:
        """A second look when an auto request leaves the queue and joins the batch: its wait is now measured
        (`waited_s` since admission), not predicted, and only its own iterations are left (beside `rows_beside`
        other active rows). Fewer steps, never more, when the wait ran long: the most steps below `chosen` that
        still meet the target, else min_steps. None keeps the choice (it still fits within one iteration's time,
        there is nothing below it, no target, or nothing measured). Why: the prediction at admission is made from
        iteration times measured at a lighter load, so the first wave of a burst is admitted at 4 steps and waits
        longer than foreseen; this bounds its tail by what is left to run, not by the whole queue."""
        if self.target_s is None or chosen <= min_steps:
            return None
        left = self.predict(chosen, rows_beside, 0, images)
        # The prediction counts whole iterations, so a wait past it by less than one iteration is within its
        # resolution: without this slack a request predicted right at the target lost a step to the thread
        # handoff between acceptance and admission (a millisecond).
        slack = self._estimate(self.iteration_s, self._bucket(rows_beside + images)) or 0.0
        if left is None or waited_s + left <= self.target_s + slack:
            return None
        for steps in range(chosen - 1, min_steps, -1):
            left = self.predict(steps, rows_beside, 0, images)
            if waited_s + left <= self.target_s:
                return Choice(steps, waited_s + left)
        return Choice(min_steps, waited_s + self.predict(min_steps, rows_beside, 0, images))
