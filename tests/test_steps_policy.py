"""`"steps": "auto"`: the policy that picks steps by load, with fake step times and no threads or clocks."""

from __future__ import annotations

import pytest

from nitrofusion.steps_policy import MovingAverage, StepPolicy


def policy(target_ms: float | None = 500, step_ms: float = 50, max_batch: int = 8) -> StepPolicy:
    p = StepPolicy(None if target_ms is None else target_ms / 1000, max_batch=max_batch, buckets=(1, 2, 4, 8))
    for b in (1, 2, 4, 8):
        p.observe_iteration(b, step_ms / 1000)
    return p


def test_light_load_gets_max_steps():
    c = policy().choose(1, 4, rows_ahead=0, row_steps_ahead=0)
    assert c.steps == 4 and c.predicted_s == pytest.approx(0.2)


def test_a_deep_queue_gets_fewer_steps_and_never_fewer_than_min():
    p = policy(target_ms=500, step_ms=50, max_batch=8)
    # 64 rows of 4 steps ahead: the new row waits ~ (64 - 7) * 4 / 8 = 28.5 -> 29 iterations, far past 500 ms
    assert p.choose(1, 4, rows_ahead=64, row_steps_ahead=256).steps == 1
    assert p.choose(2, 4, rows_ahead=64, row_steps_ahead=256).steps == 2  # min_steps still runs
    # a batch with room: no waiting, 4 steps of 50 ms fit 500 ms
    assert p.choose(1, 4, rows_ahead=7, row_steps_ahead=28).steps == 4
    # a little overflow: 8 rows ahead of 2 steps each, one more row: 1 row must finish first (1 * 2 / 8 -> 1
    # iteration) and 4 + 1 iterations x 100 ms = 500 ms meets the target exactly; with 200 ms steps, 1 step only
    slow = policy(target_ms=500, step_ms=100)
    assert slow.choose(1, 4, rows_ahead=8, row_steps_ahead=16).steps == 4
    slower = policy(target_ms=500, step_ms=200)
    assert slower.choose(1, 4, rows_ahead=8, row_steps_ahead=16).steps == 1


def test_the_estimate_adapts_when_step_times_change():
    p = policy(target_ms=300, step_ms=50)
    assert p.choose(1, 4, 0, 0).steps == 4
    for _ in range(30):  # the card slows down (or a bigger model): steps now take 150 ms
        p.observe_iteration(1, 0.150)
    assert p.choose(1, 4, 0, 0).steps == 2
    for _ in range(30):
        p.observe_iteration(1, 0.050)
    assert p.choose(1, 4, 0, 0).steps == 4


def test_decode_time_counts():
    p = policy(target_ms=310, step_ms=50)
    p.observe_decode(1, 0.150)
    assert p.choose(1, 4, 0, 0).steps == 3  # 3 * 50 + 150 = 300 ms fits, 4 * 50 + 150 does not


def test_no_target_or_nothing_measured_means_max_steps():
    assert policy(target_ms=None).choose(1, 3, rows_ahead=500, row_steps_ahead=2000).steps == 3
    fresh = StepPolicy(0.1, max_batch=8, buckets=(1, 8))
    c = fresh.choose(1, 4, 0, 0)
    assert c.steps == 4 and c.predicted_s is None


def test_unmeasured_buckets_borrow_the_nearest_scaled_by_batch():
    p = StepPolicy(1.0, max_batch=8, buckets=(1, 2, 4, 8))
    p.observe_iteration(2, 0.1)
    assert p.predict(1, rows_ahead=3, row_steps_ahead=3) == pytest.approx(0.2)  # bucket 4 ~ 2 x bucket 2


def test_moving_average_and_bad_arguments():
    m = MovingAverage(alpha=0.5)
    m.add(1.0)
    m.add(3.0)
    assert m.value == 2.0 and m.count == 2
    with pytest.raises(ValueError):
        policy().choose(3, 2, 0, 0)
    with pytest.raises(ValueError, match="greater than 0"):
        StepPolicy(0, max_batch=1, buckets=(1,))


def test_prediction_errors_are_learned():
    """Requests that keep finishing later than predicted (work the model does not see) make later choices
    more careful; ones that finish early make them bolder again."""
    p = policy(target_ms=300, step_ms=50)
    assert p.choose(1, 4, 0, 0).steps == 4  # 200 ms predicted
    for _ in range(30):
        p.observe_latency(predicted_s=0.2, actual_s=0.35)  # 150 ms late, every time
    c = p.choose(1, 4, 0, 0)
    assert c.steps == 3 and c.predicted_s == pytest.approx(0.3, abs=0.01)
    for _ in range(150):
        p.observe_latency(predicted_s=0.3, actual_s=0.2)
    assert p.choose(1, 4, 0, 0).steps == 3  # 30 late of 180: the top decile is still late
    for _ in range(p.error_window - 150):  # the late ones leave the window
        p.observe_latency(predicted_s=0.3, actual_s=0.2)
    assert p.choose(1, 4, 0, 0).steps == 4


def test_the_correction_aims_at_the_tail_not_the_typical_request():
    """A server whose requests are mostly on time but one in eight is 150 ms late (a stall the model cannot see)
    chooses as if late: the goal is p99 within 1.5x the target, and a median correction would ignore the
    stalls. error_quantile=0.5 keeps the old, typical-request behaviour."""
    late = [0.15 if i % 8 == 0 else 0.0 for i in range(80)]
    careful, typical = policy(target_ms=300, step_ms=50), policy(target_ms=300, step_ms=50)
    typical.error_quantile = 0.5
    for p in careful, typical:
        for e in late:
            p.observe_latency(predicted_s=0.2, actual_s=0.2 + e)
    assert careful.correction_s() == pytest.approx(0.15) and careful.choose(1, 4, 0, 0).steps == 3
    assert typical.correction_s() == 0.0 and typical.choose(1, 4, 0, 0).steps == 4
    with pytest.raises(ValueError, match="quantile"):
        StepPolicy(0.3, max_batch=1, buckets=(1,), error_quantile=1.5)


def test_a_request_that_waited_too_long_drops_steps_when_it_leaves_the_queue():
    p = policy(target_ms=500, step_ms=50)
    # admitted at 4 steps; it joins the batch after 100 ms: 100 + 4 x 50 fits, keep the choice
    assert p.rechoose(4, 1, waited_s=0.1, rows_beside=3) is None
    # 320 ms: 4 steps end at 520 ms, past the target by less than one 50 ms iteration: kept (the prediction's
    # resolution); 380 ms: 4 steps would end at 580, and of the fewer counts only 2 fit (380 + 100 <= 500)
    assert p.rechoose(4, 1, waited_s=0.32, rows_beside=3) is None
    c = p.rechoose(4, 1, waited_s=0.38, rows_beside=3)
    assert c.steps == 2 and c.predicted_s == pytest.approx(0.48)
    # past the target already: min_steps, and the prediction says it will miss
    late = p.rechoose(4, 2, waited_s=0.6, rows_beside=3)
    assert late.steps == 2 and late.predicted_s == pytest.approx(0.7)
    # never more steps than chosen, nothing below min_steps, nothing without a target or a measurement
    assert p.rechoose(2, 1, waited_s=0.0, rows_beside=0) is None
    assert p.rechoose(3, 3, waited_s=0.6, rows_beside=0) is None
    assert policy(target_ms=None).rechoose(4, 1, waited_s=9.0, rows_beside=0) is None
    assert StepPolicy(0.5, max_batch=8, buckets=(1, 8)).rechoose(4, 1, waited_s=9.0, rows_beside=0) is None
