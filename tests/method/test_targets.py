"""Tests for incr_ray.method.targets: the target rule (property-based) and softmax."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from incr_ray.method.targets import ensemble_probs, padded_probs, soft_targets, softmax


@st.composite
def prob_batches(draw):
    """(probs (n, C), labels (n,)) with exact zeros, one-hots and near-ties among the rows."""
    n = draw(st.integers(1, 12))
    c = draw(st.integers(2, 6))
    # Drawing from a small grid that includes 0 gives zeros and exact one-hot rows often.
    elements = st.sampled_from([0.0, 0.001, 0.1, 0.5, 1.0, 3.0, 50.0]) | st.floats(0.0, 1.0)
    raw = draw(arrays(np.float64, (n, c), elements=elements))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    empty = raw.sum(axis=1) == 0
    raw[empty, 0] = 1.0
    return raw / raw.sum(axis=1, keepdims=True), labels


thresholds = st.one_of(st.sampled_from([0.5, 0.9, 1.0]), st.floats(0.01, 1.0))


@st.composite
def rule_params(draw):
    p = draw(thresholds)
    floor = draw(st.one_of(st.none(), st.floats(0.0, p, exclude_max=True)))
    return p, floor


def _branches(probs, labels, p, floor):
    q_c = probs[np.arange(len(labels)), labels]
    keep = q_c >= p
    hard = ~keep & (q_c < floor) if floor is not None else np.zeros(len(labels), bool)
    return keep, hard, ~keep & ~hard


@settings(max_examples=200, deadline=None)
@given(prob_batches(), rule_params())
def test_soft_targets_properties(batch, params):
    probs, labels = batch
    p, floor = params
    t = soft_targets(probs, labels, threshold=p, floor=floor)
    rows = np.arange(len(labels))
    keep, hard, push = _branches(probs, labels, p, floor)

    assert t.shape == probs.shape and t.dtype == np.float64
    assert (t >= 0).all()
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=0, atol=1e-9)

    np.testing.assert_array_equal(t[keep], probs[keep])
    np.testing.assert_array_equal(t[hard], np.eye(probs.shape[1])[labels[hard]])
    assert (t[rows[~hard], labels[~hard]] >= p - 1e-12).all()
    np.testing.assert_array_equal(t[rows[push], labels[push]], p)

    # Pushed rows: every wrong class is scaled by the same factor, so ratios survive.
    wrong = np.ones_like(probs, dtype=bool)
    wrong[rows, labels] = False
    for r in rows[push]:
        q, tr = probs[r][wrong[r]], t[r][wrong[r]]
        # t_j / t_i == q_j / q_i for all pairs, written cross-multiplied to allow q_i == 0.
        np.testing.assert_allclose(np.outer(tr, q), np.outer(q, tr), rtol=1e-9, atol=1e-15)


def test_hand_example_push():
    probs = np.array([[0.5, 0.3, 0.2]])
    t = soft_targets(probs, [0], threshold=0.9)
    np.testing.assert_allclose(t, [[0.9, 0.06, 0.04]])


def test_hand_example_each_branch():
    probs = np.array([[0.95, 0.05, 0.0], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    t = soft_targets(probs, [0, 0, 2], threshold=0.9, floor=0.15)
    np.testing.assert_allclose(t[0], probs[0])  # keep
    np.testing.assert_allclose(t[1], [1.0, 0.0, 0.0])  # below floor
    np.testing.assert_allclose(t[2], [0.05, 0.05, 0.9])  # pushed


def test_certain_teacher_does_not_divide_by_zero():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    with np.errstate(all="raise"):
        t = soft_targets(probs, [0, 0], threshold=1.0)
    np.testing.assert_array_equal(t, [[1.0, 0.0], [1.0, 0.0]])


def test_threshold_one_makes_one_hot():
    probs = np.array([[0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    t = soft_targets(probs, [1, 0], threshold=1.0)
    np.testing.assert_array_equal(t, [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_empty_batch():
    t = soft_targets(np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert t.shape == (0, 4) and t.dtype == np.float64


def test_float32_input_gives_float64_and_accepts_lists():
    t = soft_targets(np.array([[0.5, 0.5]], dtype=np.float32), [1], threshold=0.8)
    assert t.dtype == np.float64
    np.testing.assert_allclose(t, [[0.2, 0.8]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 0.0}, "threshold"),
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": 0.9, "floor": 0.9}, "floor"),
        ({"threshold": 0.9, "floor": -0.1}, "floor"),
    ],
)
def test_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        soft_targets(np.array([[0.5, 0.5]]), [0], **kwargs)


@pytest.mark.parametrize(
    "probs, labels, match",
    [
        (np.array([0.5, 0.5]), [0], "2-D"),
        (np.array([[0.5, 0.5]]), [[0]], "1-D"),
        (np.array([[0.5, 0.5]]), [0, 1], "rows"),
        (np.array([[0.5, 0.5]]), [2], r"\[0, 2\)"),
        (np.array([[0.5, 0.5]]), [-1], r"\[0, 2\)"),
        (np.array([[0.5, 0.5]]), [0.0], "integer"),
        (np.array([[1.5, -0.5]]), [0], "negative"),
        (np.array([[np.nan, 1.0]]), [0], "NaN"),
        (np.array([[np.inf, 0.0]]), [0], "NaN or inf"),
        (np.array([[0.5, 0.5], [2.0, 3.0]]), [0, 0], "row 1 sums to 5"),
        (np.array([[0.5, 0.5002]]), [0], "sums to"),
    ],
)
def test_rejects_bad_inputs(probs, labels, match):
    with pytest.raises(ValueError, match=match):
        soft_targets(probs, labels)


def test_row_sum_tolerance_accepts_float32_rounding():
    soft_targets(np.array([[0.5, 0.50005]]), [0])


def test_softmax_matches_definition_and_is_stable():
    logits = np.array([[1.0, 2.0, 3.0], [1000.0, 1000.0, -1000.0]])
    p = softmax(logits)
    e = np.exp(logits[0])
    np.testing.assert_allclose(p[0], e / e.sum())
    np.testing.assert_allclose(p[1], [0.5, 0.5, 0.0], atol=1e-300)
    assert np.isfinite(p).all()


def test_softmax_temperature_flattens():
    logits = np.array([[0.0, 2.0]])
    np.testing.assert_allclose(softmax(logits, temperature=2.0), softmax(logits / 2.0))
    assert softmax(logits, 4.0)[0, 1] < softmax(logits, 1.0)[0, 1]


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_softmax_rejects_bad_temperature(temperature):
    with pytest.raises(ValueError, match="temperature"):
        softmax(np.zeros((1, 2)), temperature)


# ---------------------------------------------------------------------------------------------
# New classes (extend --allow-new-labels): the teacher's softmax padded with zeros, then the rule


@settings(max_examples=200, deadline=None)
@given(prob_batches(), rule_params(), st.integers(1, 3), st.data())
def test_padded_rule_pushes_new_class_rows_and_leaves_old_rows_alone(batch, params, added, data):
    probs, old_labels = batch
    p, floor = params
    n, known = probs.shape
    total = known + added
    labels = data.draw(arrays(np.int64, (n,), elements=st.integers(0, total - 1)))
    padded = padded_probs(probs, total)
    t = soft_targets(padded, labels, threshold=p, floor=floor)
    new = labels >= known

    np.testing.assert_array_equal(padded[:, :known], probs)
    assert (padded[:, known:] == 0).all()
    assert t.shape == (n, total)
    np.testing.assert_allclose(t.sum(axis=1), 1.0, rtol=0, atol=1e-9)
    # Old-class rows: the targets the rule gives without padding, and nothing on the new classes.
    np.testing.assert_array_equal(t[~new, :known], soft_targets(probs[~new], labels[~new], p, floor))
    assert (t[~new, known:] == 0).all()
    # New-class rows: q_c = 0 is below every floor f > 0 (one-hot); otherwise t_c = p and the
    # teacher's old-class distribution scaled by 1 - p.
    rows = np.flatnonzero(new)
    if floor is not None and floor > 0:
        np.testing.assert_array_equal(t[rows], np.eye(total)[labels[rows]])
    else:
        expected = np.zeros((len(rows), total))
        expected[:, :known] = probs[rows] * (1 - p)
        expected[np.arange(len(rows)), labels[rows]] = p
        np.testing.assert_allclose(t[rows], expected, rtol=0, atol=1e-15)


def test_padded_rule_by_hand():
    # The teacher knows (a, b); c is new. p = 0.9.
    q = np.array([[0.7, 0.3], [0.2, 0.8]])
    t = soft_targets(padded_probs(q, 3), np.array([2, 1]), threshold=0.9)
    np.testing.assert_allclose(t, [[0.07, 0.03, 0.9], [0.1, 0.9, 0.0]])
    t = soft_targets(padded_probs(q, 3), np.array([2, 1]), threshold=0.9, floor=0.05)
    np.testing.assert_allclose(t, [[0.0, 0.0, 1.0], [0.1, 0.9, 0.0]])


def test_padding_to_the_same_width_changes_nothing_and_a_map_never_shrinks():
    q = np.array([[0.25, 0.75]], dtype=np.float32)
    same = padded_probs(q, 2)
    assert same.dtype == np.float64 and np.array_equal(same, q.astype(np.float64))
    with pytest.raises(ValueError, match="below the teacher's 2 classes"):
        padded_probs(q, 1)
    with pytest.raises(ValueError, match="2-D"):
        padded_probs(np.ones(3), 4)


# ---------------------------------------------------------------------------------------------
# Ensemble teacher (teacher.ensemble): the mean of the members' softmaxes, each padded first


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 8), st.lists(st.integers(2, 5), min_size=1, max_size=4), st.integers(0, 2), st.data())
def test_the_ensemble_is_the_mean_of_its_padded_members(n, widths, added, data):
    """Members of any widths (older ones know fewer classes): every row stays on the simplex, each
    class's probability is the mean of the members' (0 from one that never saw it), and no row
    leaves the range its members span."""
    total = max(widths) + added
    members = []
    for w in widths:
        raw = data.draw(arrays(np.float64, (n, w), elements=st.sampled_from([0.0, 0.001, 1.0]) | st.floats(0.0, 1.0)))
        raw[raw.sum(axis=1) == 0, 0] = 1.0
        members.append(raw / raw.sum(axis=1, keepdims=True))
    q = ensemble_probs(members, total)
    stacked = np.stack([padded_probs(m, total) for m in members])
    assert q.shape == (n, total) and q.dtype == np.float64
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(q, stacked.sum(axis=0) / len(members), rtol=0, atol=1e-15)
    assert (q >= stacked.min(axis=0) - 1e-15).all() and (q <= stacked.max(axis=0) + 1e-15).all()
    assert (q[:, max(widths):] == 0).all()  # classes no member knows


def test_the_ensemble_by_hand():
    # Generation 0 knows (a, b); generation 1 also knows c (an extension added it); the student
    # learns (a, b, c, d). The mean gives c half of generation 1's, d nothing.
    g0 = np.array([[0.8, 0.2], [0.4, 0.6]])
    g1 = np.array([[0.6, 0.2, 0.2], [0.1, 0.1, 0.8]])
    q = ensemble_probs([g0, g1], 4)
    np.testing.assert_allclose(q, [[0.7, 0.2, 0.1, 0.0], [0.25, 0.35, 0.4, 0.0]])
    # Then the usual rule, p = 0.9: row 0 labelled a is pushed; row 1 labelled c is pushed too.
    t = soft_targets(q, np.array([0, 2]), threshold=0.9)
    np.testing.assert_allclose(t, [[0.9, 0.2 / 3, 0.1 / 3, 0.0], [0.25 / 6, 0.35 / 6, 0.9, 0.0]])


def test_one_member_is_that_member_padded_and_members_must_agree():
    q = softmax(np.array([[1.0, 2.0, 0.5]], dtype=np.float32))
    assert np.array_equal(ensemble_probs([q]), q) and np.array_equal(ensemble_probs([q], 4), padded_probs(q, 4))
    assert np.array_equal(ensemble_probs([q, q]), q)  # two equal members: the member itself
    with pytest.raises(ValueError, match="at least one member"):
        ensemble_probs([])
    with pytest.raises(ValueError, match=r"different numbers of rows \[1, 2\]"):
        ensemble_probs([q, np.vstack([q, q])])
    with pytest.raises(ValueError, match="below the teacher's 3 classes"):
        ensemble_probs([q], 2)
