"""The run-long learning-rate curve and teacher annealing."""

from __future__ import annotations

import pytest

from incr_ray.method.schedule import (RUN_SCHEDULE_FLOOR, annealed_alpha, balanced_tail_factor, linear_lr_factor,
                                     run_lr_factor)


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


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (1, 1), (4, 4)])
def test_the_generation_schedule_is_the_trainers_linear_one(warmup, total):
    from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as linear

    for step in range(total + 3):
        assert linear_lr_factor(step, warmup, total) == pytest.approx(
            linear(step, num_warmup_steps=warmup, num_training_steps=total))


def test_balanced_fine_tuning_follows_the_main_schedule_at_its_own_constant_share():
    factors = [balanced_tail_factor(s, 10, linear_lr_factor(s, 2, 10), 0.1) for s in range(14)]
    assert factors[:10] == [linear_lr_factor(s, 2, 10) for s in range(10)]
    assert factors[10:] == [0.1] * 4
