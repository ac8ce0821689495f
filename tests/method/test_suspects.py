"""Suspected label errors: which rows, in what order, and what the student trains on for them."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.method.suspects import (apply_policy, at_unit_temperature, contradiction, most_confident_first,
                                      suspect_mask)
from incr_ray.method.targets import softmax, soft_targets

PROBS = np.array([[0.95, 0.05], [0.02, 0.98], [0.5, 0.5], [0.09, 0.91], [0.10, 0.90]])
LABELS = np.array([1, 0, 0, 0, 0])


def test_a_suspect_is_a_row_whose_teacher_gives_its_label_less_than_below():
    assert suspect_mask(PROBS, LABELS, 0.1).tolist() == [True, True, False, True, False]  # 0.10 is not below 0.1
    assert not suspect_mask(PROBS, LABELS, 0.0).any()  # 0 lists none
    with pytest.raises(ValueError, match="below must be in"):
        suspect_mask(PROBS, LABELS, 1.0)


def test_a_row_of_a_class_the_teacher_never_saw_is_no_suspect():
    from incr_ray.method.targets import padded_probs

    padded = padded_probs(PROBS, 3)  # an extension added class 2: the teacher gives it 0
    labels = np.array([1, 0, 2, 0, 2])
    assert suspect_mask(padded, labels, 0.1, teacher_classes=2).tolist() == [True, True, False, True, False]
    assert suspect_mask(padded, labels, 0.1, temperature=2.0, teacher_classes=2)[[2, 4]].tolist() == [False, False]
    assert suspect_mask(padded, labels, 0.1).tolist() == [True, True, True, True, True]  # without: all of them


def test_suspects_are_judged_on_the_teachers_own_distribution_whatever_the_stored_temperature():
    logits = np.array([[2.0, -1.0], [0.3, 0.0]])
    stored = softmax(logits, 2.0)  # what the scorer stores at method.temperature 2
    np.testing.assert_allclose(at_unit_temperature(stored, 2.0), softmax(logits), rtol=1e-9)
    # At τ = 2 the first row's label gets 0.18, at τ = 1 only 0.047: a suspect at 0.1.
    assert suspect_mask(stored, [1, 1], 0.1, temperature=2.0).tolist() == [True, False]
    assert suspect_mask(stored, [1, 1], 0.1).tolist() == [False, False]


def test_the_surest_contradiction_comes_first():
    top, top_prob, label_prob = contradiction(PROBS, LABELS)
    assert top.tolist() == [0, 1, 0, 1, 1]
    np.testing.assert_allclose(label_prob, [0.05, 0.02, 0.5, 0.09, 0.10])
    order = most_confident_first(label_prob, top_prob, np.arange(5))
    assert order.tolist() == [1, 0, 3, 4, 2]
    # A tie in the label's probability: the surer top class first, then the row id.
    assert most_confident_first([0.1, 0.1, 0.1], [0.5, 0.9, 0.9], [7, 9, 8]).tolist() == [2, 1, 0]


@pytest.mark.parametrize("policy", ["keep", "one_hot", "drop"])
def test_the_lever_sets_what_the_student_trains_on(policy):
    targets = soft_targets(PROBS, LABELS, threshold=0.9)
    suspect = suspect_mask(PROBS, LABELS, 0.1)
    out, kept = apply_policy(targets, LABELS, suspect, policy)
    clean = ~suspect
    np.testing.assert_array_equal(out[clean], targets[clean])  # the other rows: the rule's targets, always
    if policy == "keep":
        np.testing.assert_array_equal(out, targets)
        assert kept.all()
    elif policy == "one_hot":
        np.testing.assert_array_equal(out[suspect], np.eye(2)[LABELS[suspect]])
        assert kept.all()
    else:
        assert kept.tolist() == clean.tolist()
        np.testing.assert_array_equal(out, targets)
    with pytest.raises(ValueError, match="policy must be one of"):
        apply_policy(targets, LABELS, suspect, "flip")
