"""The arithmetic of progress reports: throughput, ETAs, durations, the step line, scoring tenths."""

from __future__ import annotations

import pytest

from incr_ray.generation.rates import duration, steady_rate, step_line, step_rates, tenths_reached


def test_rates_and_etas_from_recent_steps():
    # 2 s per step between the first and last sample; rank 0 collated 600 tokens in those 20 s.
    samples = [(100.0, 10, 1000), (110.0, 15, 1300), (120.0, 20, 1600)]
    r = step_rates(samples, max_steps=50, rows_per_step=64, workers=4, later_steps=100)
    assert r["seconds_per_step"] == pytest.approx(2.0)
    assert r["rows_per_s"] == pytest.approx(32.0)  # 64 rows per step over all workers / 2 s
    assert r["tokens_per_s"] == pytest.approx(600 * 4 / 20)  # rank 0's tokens × workers
    assert r["eta_generation_s"] == pytest.approx(30 * 2.0)
    assert r["eta_run_s"] == pytest.approx((30 + 100) * 2.0)
    # Only the window counts: a slow start before it does not drag the rate down.
    assert step_rates([(0.0, 0, 0), (1000.0, 10, 0)], 50, 64, 4)["seconds_per_step"] == pytest.approx(100.0)
    assert step_rates(samples[-1:], 50, 64, 4) == dict.fromkeys(r)  # one sample: nothing measurable yet
    assert step_rates([(1.0, 5, 0), (2.0, 5, 0)], 50, 64, 4)["rows_per_s"] is None  # no step taken
    assert step_rates(samples, max_steps=20, rows_per_step=64, workers=4)["eta_generation_s"] == 0


def test_durations_and_the_step_line():
    assert [duration(s) for s in (None, 4.4, 59.6, 250, 3600 + 300, 50 * 3600)] == ["?", "4s", "1m00s", "4m10s", "1h05m", "50h00m"]
    rates = step_rates([(0.0, 0, 0), (10.0, 5, 5000)], 20, 32, 2, later_steps=40)
    assert step_line(1, 5, 20, 0.51234, 2e-5, rates) == (
        "[gen 1] step 5/20  loss 0.5123  lr 2.00e-05  16.0 rows/s  1000 tokens/s  ETA gen 30s, run 1m50s")
    assert step_line(0, 1, 20, 1.0, 1e-3, step_rates([], 20, 32, 2)) == "[gen 0] step 1/20  loss 1.0000  lr 1.00e-03"


def test_scoring_tenths():
    assert tenths_reached(0, 9, 100) == []
    assert tenths_reached(0, 10, 100) == [1]
    assert tenths_reached(9, 35, 100) == [1, 2, 3]
    assert tenths_reached(95, 100, 100) == [10]
    assert tenths_reached(0, 7, 7) == list(range(1, 11))  # a tiny block reaches every mark at once
    assert tenths_reached(0, 5, 0) == []
    # Batch by batch, every tenth is reported exactly once.
    seen, done = [], 0
    for batch in [128] * 7 + [60]:
        seen += tenths_reached(done, done + batch, 956)
        done += batch
    assert seen == list(range(1, 11))


def test_the_steady_rate_leaves_the_warm_up_out():
    # A 20 s first step (allocations, a resume's load), then 1 s per step: 30 steps of 64 rows.
    ends = [20.0 + i for i in range(30)]
    r = steady_rate(ends, started=0.0, rows_per_step=64)
    assert r["steady_samples_per_second"] == pytest.approx(64.0)  # steps 4..30 over their 26 s
    assert r["warmup_seconds"] == pytest.approx(22.0)  # 10% of 30 steps: the first three
    whole = 30 * 64 / ends[-1]
    assert whole < 0.7 * r["steady_samples_per_second"]  # what samples_per_second says of the same fit
    # One warm-up step at least; too few steps for a rate: none, not a guess.
    assert steady_rate([5.0, 6.0, 7.0], 0.0, 10)["steady_samples_per_second"] == pytest.approx(10.0)
    assert steady_rate([5.0, 6.0], 0.0, 10) == {"steady_samples_per_second": None, "warmup_seconds": None}
