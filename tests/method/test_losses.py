"""Tests for incr_ray.method.losses: soft cross-entropy, temperature scaling and the hard-label mix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from incr_ray.method.losses import distillation_loss, soft_cross_entropy


def _batch(b=5, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, generator=g, dtype=dtype)
    targets = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, c, (b,), generator=g)
    return logits, targets, labels


def test_equals_cross_entropy_for_one_hot_targets_with_same_gradients():
    logits, _, labels = _batch()
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = soft_cross_entropy(a, F.one_hot(labels, 4).double())
    ref = F.cross_entropy(b, labels)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(a.grad, b.grad)


def test_hand_example_with_temperature_squared_scaling():
    # logits/τ = [0, ln 3] → softmax [1/4, 3/4]; −Σ t log p with t = [1/2, 1/2].
    tau = 2.0
    logits = torch.tensor([[0.0, 2.0 * math.log(3.0)]], dtype=torch.float64)
    targets = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    ce = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert soft_cross_entropy(logits, targets, tau).item() == pytest.approx(tau**2 * ce, rel=1e-12)


def test_temperature_is_the_mean_over_rows_of_scaled_ce():
    logits, targets, _ = _batch()
    tau = 3.0
    per_row = -(targets * torch.log_softmax(logits / tau, dim=-1)).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(logits, targets, tau), tau**2 * per_row.mean())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alpha_mix_is_the_weighted_sum(alpha):
    logits, targets, labels = _batch()
    tau = 2.0
    hard, soft = F.cross_entropy(logits, labels), soft_cross_entropy(logits, targets, tau)
    expected = alpha * hard + (1 - alpha) * soft
    torch.testing.assert_close(distillation_loss(logits, targets, labels, tau, alpha), expected)


def test_zero_weight_term_needs_no_input():
    logits, targets, labels = _batch()
    hard_only = distillation_loss(logits, None, labels, alpha=1.0)
    soft_only = distillation_loss(logits, targets, None, alpha=0.0)
    torch.testing.assert_close(hard_only, F.cross_entropy(logits, labels))
    torch.testing.assert_close(soft_only, soft_cross_entropy(logits, targets))
    with pytest.raises(ValueError, match="labels"):
        distillation_loss(logits, targets, None, alpha=0.5)
    with pytest.raises(ValueError, match="targets"):
        distillation_loss(logits, None, labels, alpha=0.5)


def test_gradcheck_tiny_case():
    logits, targets, labels = _batch(b=3, c=3, seed=1)
    logits.requires_grad_()
    assert torch.autograd.gradcheck(lambda z: distillation_loss(z, targets, labels, 1.7, 0.4), (logits,))


def test_soft_gradient_is_softmax_minus_target_over_batch():
    # d/dz of τ²·mean CE(softmax(z/τ), t) = τ·(softmax(z/τ) − t)/B: why τ² is the right factor.
    logits, targets, _ = _batch()
    tau = 2.5
    logits.requires_grad_()
    soft_cross_entropy(logits, targets, tau).backward()
    expected = tau * (torch.softmax(logits.detach() / tau, -1) - targets) / logits.shape[0]
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_are_computed_in_float32(dtype):
    logits, targets, labels = _batch(dtype=torch.float32)
    half = logits.to(dtype).requires_grad_()
    loss = distillation_loss(half, targets.float(), labels, 2.0, 0.5)
    assert loss.dtype == torch.float32
    ref = distillation_loss(half.detach().float(), targets.float(), labels, 2.0, 0.5)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert half.grad.dtype == dtype


def test_rejects_bad_arguments():
    logits, targets, labels = _batch()
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(logits, targets, 0.0)
    with pytest.raises(ValueError, match="equal shapes"):
        soft_cross_entropy(logits, targets[:, :3])
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(logits, targets, labels, alpha=1.5)
    with pytest.raises(ValueError, match="labels must be"):
        distillation_loss(logits, targets, labels[:2], alpha=0.5)
