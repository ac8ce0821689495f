"""Tests for incr_ray.method.targets.target_rule_stats: what the teacher and the target rule did."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings

from incr_ray.method.targets import (
    RULE_STAT_KEYS,
    finalize_rule_stats,
    merge_rule_stats,
    soft_targets,
    target_rule_stats,
)
from test_targets import prob_batches, rule_params


def _stats(probs, labels, p, floor):
    return target_rule_stats(probs, labels, soft_targets(probs, labels, p, floor), p, floor)


def test_hand_example_each_branch():
    probs = np.array([[0.95, 0.05, 0.0], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    labels = np.array([0, 0, 2])
    s = _stats(probs, labels, 0.9, 0.15)
    # Row 0 kept (q_c .95), right; row 1 floored (.1 < .15), wrong; row 2 pushed (.6), right.
    assert (s["rows"], s["teacher_correct"], s["kept"], s["pushed"], s["floored"]) == (3, 2, 1, 1, 1)
    assert s["teacher_nll_sum"] == pytest.approx(-(math.log(0.95) + math.log(0.1) + math.log(0.6)))
    h_kept = -(0.95 * math.log(0.95) + 0.05 * math.log(0.05))  # t = q, its 0 contributes 0
    h_pushed = -(2 * 0.05 * math.log(0.05) + 0.9 * math.log(0.9))  # t = [.05, .05, .9]
    assert s["target_entropy_sum"] == pytest.approx(h_kept + 0.0 + h_pushed)

    f = finalize_rule_stats(s)
    assert f["accuracy"] == pytest.approx(2 / 3)
    assert f["nll"] == pytest.approx(s["teacher_nll_sum"] / 3)
    assert (f["kept"], f["pushed"], f["floored"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert f["target_entropy"] == pytest.approx((h_kept + h_pushed) / 3)
    assert f["rows"] == 3.0


def test_nll_is_of_the_unsoftened_teacher():
    from incr_ray.method.targets import softmax

    logits = np.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    labels = np.array([0, 2])
    soft = softmax(logits, temperature=3.0)  # as stored with method.temperature 3
    s = target_rule_stats(soft, labels, soft_targets(soft, labels, 0.9), 0.9, None, temperature=3.0)
    assert s["teacher_nll_sum"] == pytest.approx(-np.log(softmax(logits)[[0, 1], labels]).sum())
    # The branches and the accuracy read the probabilities as stored.
    assert s == pytest.approx({**_stats(soft, labels, 0.9, None), "teacher_nll_sum": s["teacher_nll_sum"]})


def test_no_floor_pushes_the_far_wrong_rows():
    probs = np.array([[0.1, 0.9], [0.5, 0.5]])
    s = _stats(probs, np.array([0, 0]), 0.9, None)
    assert (s["kept"], s["pushed"], s["floored"]) == (0, 2, 0)
    # Ties go to the first class, as in the holdout metrics: row 1 counts as right.
    assert s["teacher_correct"] == 1


def test_floor_makes_one_hot_rows_with_zero_entropy():
    probs = np.array([[0.05, 0.95], [0.02, 0.98]])
    s = _stats(probs, np.array([0, 0]), 0.9, 0.1)
    assert (s["floored"], s["pushed"], s["kept"]) == (2, 0, 0)
    assert s["target_entropy_sum"] == 0.0


def test_threshold_one_makes_every_row_pushed_or_kept():
    probs = np.array([[1.0, 0.0], [0.7, 0.3], [0.0, 1.0]])
    s = _stats(probs, np.array([0, 0, 0]), 1.0, None)
    assert (s["kept"], s["pushed"], s["floored"]) == (1, 2, 0)
    # Every target is one-hot: no entropy. The certain-but-wrong row's NLL is clipped, not inf.
    assert s["target_entropy_sum"] == 0.0
    assert s["teacher_nll_sum"] == pytest.approx(-math.log(0.7) - math.log(1e-12))


@settings(max_examples=100, deadline=None)
@given(prob_batches(), rule_params())
def test_shares_sum_to_one_and_batches_add_up(batch, params):
    probs, labels = batch
    p, floor = params
    whole = _stats(probs, labels, p, floor)
    assert whole["kept"] + whole["pushed"] + whole["floored"] == whole["rows"] == len(labels)
    if floor is None:
        assert whole["floored"] == 0
    if p == 1.0 and floor is None:
        assert whole["kept"] + whole["pushed"] == whole["rows"]
    f = finalize_rule_stats(whole)
    assert f["kept"] + f["pushed"] + f["floored"] == pytest.approx(1.0)
    assert 0.0 <= f["accuracy"] <= 1.0 and f["nll"] >= 0.0
    assert 0.0 <= f["target_entropy"] <= math.log(probs.shape[1]) + 1e-9

    # Summed over any split into batches, the statistics are those of the whole set.
    cut = len(labels) // 2
    parts = merge_rule_stats([_stats(probs[:cut], labels[:cut], p, floor),
                              _stats(probs[cut:], labels[cut:], p, floor)])
    for k in RULE_STAT_KEYS:
        assert parts[k] == pytest.approx(whole[k], abs=1e-9), k


def test_empty_batch_merges_and_an_empty_total_is_refused():
    empty = _stats(np.zeros((0, 3)), np.zeros(0, dtype=np.int64), 0.9, None)
    assert set(empty) == set(RULE_STAT_KEYS) and empty["rows"] == 0
    one = _stats(np.array([[0.2, 0.8, 0.0]]), np.array([1]), 0.9, None)
    assert merge_rule_stats([empty, one]) == pytest.approx(one)
    with pytest.raises(ValueError, match="no rows"):
        finalize_rule_stats(empty)


def test_rejects_mismatched_targets_and_bad_lists():
    probs = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match="targets has shape"):
        target_rule_stats(probs, [0], np.zeros((2, 2)), 0.9)
    with pytest.raises(ValueError, match="floor"):
        target_rule_stats(probs, [0], probs, 0.9, 0.95)
    with pytest.raises(ValueError, match="at least one"):
        merge_rule_stats([])
    with pytest.raises(ValueError, match="keys"):
        merge_rule_stats([{"rows": 1}])
