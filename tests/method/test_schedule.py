"""The run-long learning-rate curve and teacher annealing."""

from __future__ import annotations

import pytest

from incr_ray.method.schedule import RUN_SCHEDULE_FLOOR, annealed_alpha, run_lr_factor


def test_run_schedule_warms_up_decays_to_the_floor_and_stays():
    warmup, total = 4, 24
    f = [run_lr_factor(s, warmup, total) for s in range(30)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == 1.0
    assert f[14] == pytest.approx(1.0 - (1.0 - RUN_SCHEDULE_FLOOR) * 10 / 20)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # never rises again
    assert f[24:] == [RUN_SCHEDULE_FLOOR] * 6  # extensions train at the floor
    assert run_lr_factor(0, 0, 10) == 1.0  # no warmup: the peak at once


@pytest.mark.parametrize("warmup, total", [(5, 5), (-1, 3), (0, 0)])
def test_run_schedule_refuses_an_empty_window(warmup, total):
    with pytest.raises(ValueError, match="warmup < total"):
        run_lr_factor(0, warmup, total)


def test_annealing_moves_the_hard_label_weight_from_alpha_to_one():
    assert annealed_alpha(0.0, 0, 100) == 0.0
    assert annealed_alpha(0.0, 50, 100) == 0.5
    assert annealed_alpha(0.2, 50, 100) == pytest.approx(0.6)
    assert annealed_alpha(0.2, 100, 100) == 1.0
    assert annealed_alpha(0.2, 500, 100) == 1.0
