"""The EWC penalty ``λ/2 · Σ F (θ − θ*)²`` as a plain function: its value, its gradient, its checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from incr_ray.method.losses import ewc_penalty


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    theta = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True) for s in shapes]
    anchor = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    fisher = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    return theta, anchor, fisher


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), strength=st.floats(0.0, 100.0))
def test_value_and_gradient_are_the_quadratic_forms(seed, strength):
    theta, anchor, fisher = _weights(seed)
    penalty = ewc_penalty([t - a for t, a in zip(theta, anchor)], fisher, strength)
    expected = 0.5 * strength * sum((f * (t - a) ** 2).sum() for t, a, f in zip(theta, anchor, fisher))
    torch.testing.assert_close(penalty, expected.detach(), rtol=1e-12, atol=1e-12)
    assert penalty.dtype == torch.float64 and penalty.shape == ()
    penalty.backward()
    for t, a, f in zip(theta, anchor, fisher):  # ∂/∂θ = λ · F · (θ − θ*)
        torch.testing.assert_close(t.grad, strength * f * (t - a).detach(), rtol=1e-12, atol=1e-12)


def test_zero_at_the_anchor_off_at_lambda_zero_and_free_where_f_is_zero():
    theta, anchor, fisher = _weights(0)
    assert ewc_penalty([a - a for a in anchor], fisher, 10.0).item() == 0.0
    assert ewc_penalty([t - a for t, a in zip(theta, anchor)], fisher, 0.0).item() == 0.0
    zero_f = [torch.zeros_like(f) for f in fisher]
    penalty = ewc_penalty([t - a for t, a in zip(theta, anchor)], zero_f, 10.0)
    assert penalty.item() == 0.0
    penalty.backward()
    assert all(torch.count_nonzero(t.grad) == 0 for t in theta)  # unimportant weights move freely


def test_sixteen_bit_deltas_are_squared_in_float32():
    delta = torch.full((1000,), 3e-3, dtype=torch.bfloat16)
    penalty = ewc_penalty([delta], [torch.ones(1000)], 2.0)
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, torch.tensor(1000 * float(delta[0]) ** 2), rtol=1e-6, atol=0)


def test_no_weights_is_no_penalty():
    assert ewc_penalty([], [], 1.0).item() == 0.0


@pytest.mark.parametrize("deltas, fisher, strength, message", [
    ([torch.zeros(2)], [torch.zeros(2)], -1.0, "strength"),
    ([torch.zeros(2)], [], 1.0, "1 deltas but 0"),
    ([torch.zeros(2)], [torch.zeros(3)], 1.0, "shape"),
])
def test_bad_inputs_say_what_is_wrong(deltas, fisher, strength, message):
    with pytest.raises(ValueError, match=message):
        ewc_penalty(deltas, fisher, strength)
