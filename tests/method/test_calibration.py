"""Temperature scaling: the fitted temperature minimises the NLL and leaves the argmax alone."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.method.calibration import fit_temperature, nll_at
from incr_ray.method.metrics import flip_rates


def _overconfident(n=2000, c=3, scale=4.0, seed=0):
    """Logits whose softmax at T = ``scale`` is the true distribution the labels are drawn from."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(size=(n, c))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=row) for row in p])
    return true_logits * scale, labels


def test_fitted_temperature_recovers_the_overconfidence_and_is_the_nll_minimum():
    logits, labels = _overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.15)
    grid = np.exp(np.linspace(np.log(0.1), np.log(15), 400))
    best = grid[np.argmin([nll_at(logits, labels, g) for g in grid])]
    assert t == pytest.approx(best, rel=0.02)
    assert nll_at(logits, labels, t) < nll_at(logits, labels, 1.0)


def test_an_underconfident_model_gets_a_temperature_below_one():
    logits, labels = _overconfident(scale=0.3)
    assert fit_temperature(logits, labels) < 1.0


def test_fit_temperature_checks_its_input():
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == 1.0
    with pytest.raises(ValueError, match="2-D"):
        fit_temperature(np.zeros(3), np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))


def test_flip_rates_align_rows_by_id():
    truth = (np.array([1, 2, 3, 4]), np.array([0, 1, 1, 0]))
    before = (np.array([4, 3, 2, 1]), np.array([0, 0, 1, 0]))  # right on 1, 2, 4
    after = (np.array([2, 1, 3, 4, 4]), np.array([0, 0, 1, 1, 1]))  # right on 1, 3; a duplicate id
    rates = flip_rates(before, after, truth)
    assert rates == {"flip_rate": pytest.approx(0.5), "fix_rate": pytest.approx(0.25), "rows": 4}
    assert flip_rates((np.array([9]), np.array([0])), after, truth)["rows"] == 0


def test_a_slice_the_model_gets_all_right_stops_at_the_bound():
    """NLL keeps falling as T → 0 when every row is right: the fit stops at T = 0.25, not near 0."""
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.5, 0.0], [0.0, 0.0, 3.0]] * 3)
    labels = np.array([0, 1, 2] * 3)
    assert fit_temperature(logits, labels) == pytest.approx(0.25, rel=1e-3)
