"""Herding: a class's exemplars, picked so the running mean of the picks tracks the class mean."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incr_ray.method.herding import class_memory, herding_order, l2_normalised


def _unit_rows(seed: int, n: int, d: int) -> np.ndarray:
    return l2_normalised(np.random.default_rng(seed).normal(size=(n, d)))


features_strategy = st.tuples(st.integers(1, 30), st.integers(1, 6), st.integers(0, 2**31 - 1)).map(
    lambda t: _unit_rows(t[2], t[0], t[1]))


@settings(max_examples=60, deadline=None)
@given(x=features_strategy, budget=st.integers(0, 40))
def test_picks_are_distinct_rows_and_as_many_as_the_budget_allows(x, budget):
    picks, distances = herding_order(x, budget)
    assert len(picks) == len(distances) == min(budget, len(x))
    assert len(set(picks.tolist())) == len(picks) and ((0 <= picks) & (picks < len(x))).all()


@settings(max_examples=60, deadline=None)
@given(x=features_strategy)
def test_the_first_pick_is_the_row_closest_to_the_mean(x):
    picks, distances = herding_order(x, 1)
    gaps = np.linalg.norm(x - x.mean(axis=0), axis=1)
    assert gaps[picks[0]] == pytest.approx(gaps.min()) and distances[0] == pytest.approx(gaps.min())


@settings(max_examples=40, deadline=None)
@given(x=features_strategy)
def test_a_budget_larger_than_the_class_returns_every_row_and_ends_at_the_mean(x):
    picks, distances = herding_order(x, len(x) + 5)
    assert sorted(picks.tolist()) == list(range(len(x)))
    assert distances[-1] == pytest.approx(0.0, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(x=features_strategy, budget=st.integers(1, 30))
def test_each_distance_is_that_of_the_picks_so_far_and_each_pick_the_greedy_best(x, budget):
    picks, distances = herding_order(x, budget)
    mu = x.mean(axis=0)
    for k in range(len(picks)):
        np.testing.assert_allclose(distances[k], np.linalg.norm(mu - x[picks[:k + 1]].mean(axis=0)), atol=1e-9)
        rest = np.setdiff1d(np.arange(len(x)), picks[:k])
        best = min(np.linalg.norm(mu - (x[picks[:k]].sum(axis=0) + x[j]) / (k + 1)) for j in rest)
        assert distances[k] == pytest.approx(best, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 30), d=st.integers(3, 6), budget=st.integers(0, 30), seed=st.integers(0, 1000))
def test_the_picks_are_the_same_rows_in_any_order_and_on_every_call(n, d, budget, seed):
    # Gaussian rows in 3 or more dimensions: no ties, from 3 rows on (two rows are always equally
    # far from their mean, and the first pick is then the first row in whichever order they come).
    x = _unit_rows(seed, n, d)
    picks, distances = herding_order(x, budget)
    again, same = herding_order(x.copy(), budget)
    np.testing.assert_array_equal(picks, again)
    np.testing.assert_array_equal(distances, same)
    perm = np.random.default_rng(seed).permutation(len(x))
    shuffled, _ = herding_order(x[perm], budget)
    np.testing.assert_array_equal(perm[shuffled], picks)


def test_herding_stands_for_the_class_better_than_a_random_memory():
    x = _unit_rows(0, 400, 16)
    _, distances = herding_order(x, 20)
    rng = np.random.default_rng(1)
    random = [np.linalg.norm(x.mean(axis=0) - x[rng.choice(400, 20, replace=False)].mean(axis=0)) for _ in range(200)]
    assert distances[-1] < min(random)


def test_normalised_rows_have_unit_length_or_stay_zero():
    rows = np.array([[3.0, 4.0], [0.0, 0.0], [-1e-3, 0.0], [2.0, -2.0]])
    np.testing.assert_allclose(l2_normalised(rows), [[0.6, 0.8], [0, 0], [-1, 0], [2**-0.5, -(2**-0.5)]])


def test_class_memory_herds_each_class_within_its_budget():
    x = _unit_rows(3, 25, 4)
    labels = np.array([2] * 10 + [0] * 12 + [5] * 3)
    index, rank, distance = class_memory(x, labels, 5)
    assert labels[index].tolist() == [0] * 5 + [2] * 5 + [5] * 3  # by class, a class of 3 gives all 3
    assert rank.tolist() == [0, 1, 2, 3, 4] * 2 + [0, 1, 2]
    members = np.flatnonzero(labels == 2)
    picks, dist = herding_order(x[members], 5)
    np.testing.assert_array_equal(index[5:10], members[picks])
    np.testing.assert_array_equal(distance[5:10], dist)
    assert [len(a) for a in class_memory(x[:0], labels[:0], 5)] == [0, 0, 0]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="budget must be"):
        herding_order(np.zeros((3, 2)), -1)
    with pytest.raises(ValueError, match="must be \\(n, d\\)"):
        herding_order(np.zeros(3), 1)
    with pytest.raises(ValueError, match="labels"):
        class_memory(np.zeros((3, 2)), np.zeros(2), 1)
