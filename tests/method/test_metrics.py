"""Tests for incr_ray.method.metrics: hand-computed examples and additivity of the per-batch statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from incr_ray.method.metrics import batch_stats, class_counts, finalize, merge_stats, old_new_split


def evaluate_probs(probs, labels, num_bins: int = 15):
    """Metrics of a set that fits in one array."""
    return finalize(batch_stats(probs, labels, num_bins))

# Four rows, two classes: predictions 0, 0, 1, 1 against labels 0, 1, 1, 0.
PROBS = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
LABELS = np.array([0, 1, 1, 0])


def test_hand_example():
    m = evaluate_probs(PROBS, LABELS, num_bins=4)
    assert m["n"] == 4 and isinstance(m["n"], int)
    assert m["accuracy"] == pytest.approx(0.5)
    # Confusion [[1, 1], [1, 1]]: F1 = 2·1 / (2 + 2) for both classes.
    assert m["macro_f1"] == pytest.approx(0.5)
    assert m["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.8) + math.log(0.3)) / 4)
    # Bin [0.5, 0.75): confidences 0.6, 0.7, both wrong → |0 − 0.65|·2/4.
    # Bin [0.75, 1]:  confidences 0.9, 0.8, both right → |1 − 0.85|·2/4.
    assert m["ece"] == pytest.approx(0.325 + 0.075)


def test_hand_example_stats():
    s = batch_stats(PROBS, LABELS, num_bins=4)
    assert set(s) == {"n", "confusion", "nll_sum", "bin_count", "bin_conf_sum", "bin_correct_sum"}
    np.testing.assert_array_equal(s["n"], [4])
    np.testing.assert_array_equal(s["confusion"], [[1, 1], [1, 1]])
    np.testing.assert_array_equal(s["bin_count"], [0, 0, 2, 2])
    np.testing.assert_allclose(s["bin_conf_sum"], [0, 0, 1.3, 1.7])
    np.testing.assert_array_equal(s["bin_correct_sum"], [0, 0, 0, 2])
    assert s["nll_sum"].shape == (1,)


def test_confusion_is_true_by_pred_and_f1_is_per_class():
    # labels 0,0,0,1 vs preds 0,0,1,1: F1_0 = 2·2/(3+2), F1_1 = 2·1/(1+2).
    probs = np.array([[0.8, 0.2], [0.7, 0.3], [0.4, 0.6], [0.1, 0.9]])
    labels = np.array([0, 0, 0, 1])
    np.testing.assert_array_equal(batch_stats(probs, labels)["confusion"], [[2, 1], [0, 1]])
    assert evaluate_probs(probs, labels)["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_class_never_true_nor_predicted_is_left_out_of_macro_f1():
    with_unused = np.hstack([PROBS, np.zeros((4, 1))])
    assert evaluate_probs(with_unused, LABELS)["macro_f1"] == pytest.approx(0.5)


def test_class_predicted_but_never_true_counts_as_zero():
    # Class 1 is predicted once and never true: F1_1 = 0; class 0: tp 1, support 2, pred 1 → 2/3.
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    assert evaluate_probs(probs, [0, 0])["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_bin_edges_and_certain_rows():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
    s = batch_stats(probs, [0, 1, 1], num_bins=2)
    # Confidence 1.0 falls in the last bin; 0.5 opens bin 1; ties predict the first class.
    np.testing.assert_array_equal(s["bin_count"], [0, 3])
    np.testing.assert_array_equal(s["confusion"], [[1, 0], [1, 1]])


def test_nll_is_clipped_for_zero_probability():
    m = evaluate_probs(np.array([[1.0, 0.0]]), [1])
    assert m["nll"] == pytest.approx(-math.log(1e-12))
    assert m["ece"] == pytest.approx(1.0)


def _reference(probs, labels, num_bins):
    """Row-by-row restatement of the definitions, to check the vectorised code against."""
    n, c = probs.shape
    pred = [int(np.argmax(r)) for r in probs]
    acc = sum(p == y for p, y in zip(pred, labels)) / n
    f1s = []
    for k in range(c):
        tp = sum(p == k and y == k for p, y in zip(pred, labels))
        fp = sum(p == k and y != k for p, y in zip(pred, labels))
        fn = sum(p != k and y == k for p, y in zip(pred, labels))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    nll = -sum(math.log(max(probs[i, labels[i]], 1e-12)) for i in range(n)) / n
    ece = 0.0
    for b in range(num_bins):
        members = [i for i in range(n) if min(int(probs[i, pred[i]] * num_bins), num_bins - 1) == b]
        if members:
            conf = sum(probs[i, pred[i]] for i in members) / len(members)
            hit = sum(pred[i] == labels[i] for i in members) / len(members)
            ece += abs(hit - conf) * len(members) / n
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s), "nll": nll, "ece": ece, "n": n}


@st.composite
def eval_batches(draw):
    n = draw(st.integers(2, 30))
    c = draw(st.integers(2, 5))
    elements = st.sampled_from([0.0, 0.1, 1.0, 4.0]) | st.floats(0.0, 1.0)
    raw = draw(arrays(np.float64, (n, c), elements=elements))
    raw[raw.sum(axis=1) == 0, 0] = 1.0
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, c - 1)))
    return raw / raw.sum(axis=1, keepdims=True), labels, draw(st.integers(1, n - 1)), draw(st.integers(1, 15))


@settings(max_examples=100, deadline=None)
@given(eval_batches())
def test_matches_reference_and_halves_merge_to_the_whole(batch):
    probs, labels, cut, num_bins = batch
    whole = batch_stats(probs, labels, num_bins)
    halves = [batch_stats(probs[:cut], labels[:cut], num_bins), batch_stats(probs[cut:], labels[cut:], num_bins)]
    merged = merge_stats(halves)
    for key in whole:
        assert merged[key].shape == whole[key].shape
        np.testing.assert_allclose(merged[key], whole[key], rtol=1e-12, atol=1e-12)
    m = finalize(merged)
    ref = _reference(probs, labels, num_bins)
    assert m["n"] == ref["n"]
    for key in ("accuracy", "macro_f1", "nll", "ece"):
        assert m[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key


def test_merge_accepts_an_empty_batch():
    empty = batch_stats(np.zeros((0, 2)), np.zeros(0, dtype=np.int64), num_bins=4)
    assert finalize(merge_stats([empty, batch_stats(PROBS, LABELS, 4)])) == evaluate_probs(PROBS, LABELS, 4)


def test_errors():
    with pytest.raises(ValueError, match="at least one"):
        merge_stats([])
    with pytest.raises(ValueError, match="num_bins"):
        merge_stats([batch_stats(PROBS, LABELS, 4), batch_stats(PROBS, LABELS, 5)])
    with pytest.raises(ValueError, match="keys"):
        merge_stats([{"n": np.array([1])}])
    with pytest.raises(ValueError, match="no rows"):
        finalize(batch_stats(np.zeros((0, 2)), np.zeros(0, dtype=np.int64)))
    with pytest.raises(ValueError, match="num_bins"):
        batch_stats(PROBS, LABELS, num_bins=0)
    with pytest.raises(ValueError, match="sums to"):
        batch_stats(np.array([[2.0, 1.0]]), [0])
    with pytest.raises(ValueError, match="rows"):
        batch_stats(PROBS, LABELS[:3])


# Old and new classes: three old classes (0-2), class 3 added later.
# labels 0 0 1 2 3 3 3 against predictions 0 1 1 2 3 0 3 (student) and 0 0 1 2 0 0 1 (teacher, 3 classes).
OLD_NEW_LABELS = np.array([0, 0, 1, 2, 3, 3, 3])
STUDENT_PREDS = np.array([0, 1, 1, 2, 3, 0, 3])
TEACHER_PREDS = np.array([0, 0, 1, 2, 0, 0, 1])


def test_class_counts_are_the_confusion_diagonal_and_row_sums():
    rows, correct = class_counts(OLD_NEW_LABELS, STUDENT_PREDS, 4)
    np.testing.assert_array_equal(rows, [2, 1, 1, 3])
    np.testing.assert_array_equal(correct, [1, 1, 1, 2])
    probs = np.eye(4)[STUDENT_PREDS]
    confusion = batch_stats(probs, OLD_NEW_LABELS)["confusion"]
    np.testing.assert_array_equal(rows, confusion.sum(axis=1))
    np.testing.assert_array_equal(correct, np.diag(confusion))
    with pytest.raises(ValueError, match=r"class ids in \[0, 3\)"):
        class_counts(OLD_NEW_LABELS, STUDENT_PREDS, 3)


def test_old_new_split_hand_example():
    rows, correct = class_counts(OLD_NEW_LABELS, STUDENT_PREDS, 4)
    _, before = class_counts(OLD_NEW_LABELS, TEACHER_PREDS, 4)
    s = old_new_split(rows, correct, [0, 1, 2], correct_before=before)
    assert (s["rows"], s["old_rows"], s["new_rows"]) == (7, 4, 3)
    assert s["accuracy"] == pytest.approx(5 / 7)
    assert s["old_accuracy"] == pytest.approx(3 / 4) and s["new_accuracy"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx([0.5, 1.0, 1.0, 2 / 3])
    # The teacher got all four old-class rows right; the student calls row 1 (class 0) class 1.
    assert s["old_accuracy_before"] == pytest.approx(1.0)
    assert s["forgetting"] == pytest.approx(1.0 - 3 / 4)


def test_old_new_split_without_rows_of_a_side():
    s = old_new_split([3, 2, 0], [3, 1, 0], [0, 1], correct_before=[3, 2, 0])
    assert s["new_rows"] == 0 and s["new_accuracy"] is None and s["recall"][2] is None
    assert s["forgetting"] == pytest.approx(1.0 - 0.8)
    nothing_old = old_new_split([0, 4], [0, 1], [0], correct_before=[0, 0])
    assert nothing_old["old_accuracy"] is None and nothing_old["forgetting"] is None
    assert "forgetting" not in old_new_split([3, 2], [3, 1], [0])


def test_old_new_split_refuses_what_cannot_be_counts():
    with pytest.raises(ValueError, match="old_classes must be class ids"):
        old_new_split([1, 1], [1, 1], [2])
    with pytest.raises(ValueError, match="correct must lie between 0 and rows"):
        old_new_split([1, 1], [2, 0], [0])
    with pytest.raises(ValueError, match="correct_before must have shape"):
        old_new_split([1, 1], [1, 0], [0], correct_before=[1])


@settings(max_examples=100, deadline=None)
@given(eval_batches(), st.integers(1, 4))
def test_old_new_split_weights_to_the_overall_accuracy(batch, old_count):
    """old and new accuracy, weighted by their rows, are the overall accuracy, which is
    finalize's; recall is each class's share of its rows predicted right."""
    probs, labels, _, _ = batch
    num_classes = probs.shape[1]
    old = range(min(old_count, num_classes))
    rows, correct = class_counts(labels, probs.argmax(axis=1), num_classes)
    s = old_new_split(rows, correct, old, correct_before=correct)
    parts = [(s[f"{side}_accuracy"] or 0.0) * s[f"{side}_rows"] for side in ("old", "new")]
    assert sum(parts) / s["rows"] == pytest.approx(finalize(batch_stats(probs, labels))["accuracy"])
    assert s["forgetting"] in (None, 0.0)
    for c in range(num_classes):
        mine = labels == c
        assert s["recall"][c] == (None if not mine.any() else pytest.approx((probs[mine].argmax(axis=1) == c).mean()))
