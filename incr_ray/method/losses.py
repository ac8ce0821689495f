"""The student's training loss: cross-entropy against soft targets, with temperature and a hard-label mix.

``soft_cross_entropy`` is the method's loss (a student against the targets built by
:func:`incr_ray.method.targets.soft_targets`); ``distillation_loss`` adds Hinton et al.'s optional
``α · hard CE`` term. Both are plain torch functions with no ray or transformers import, so the
training loop only runs the forward pass and calls one of them.

Shapes: ``B`` rows in the batch, ``C`` classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # log_softmax in bf16/fp16 loses the small probabilities that soft targets care about;
    # float64 inputs (tests, gradient checks) keep their precision.
    return torch.promote_types(logits.dtype, torch.float32)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Cross-entropy of the student's softened distribution against probability targets.

    ``loss = τ² · mean_b( −Σ_c t[b, c] · log_softmax(logits[b] / τ)[c] )``. The ``τ²`` factor
    (Hinton et al., 2015) keeps gradient magnitudes independent of ``τ``, so changing the
    temperature needs no new learning rate. With one-hot targets and ``τ = 1`` this equals
    ``F.cross_entropy(logits, labels)``.

    Args:
        logits: ``(B, C)`` student scores, any float dtype (bf16/fp16 are computed in float32).
        targets: ``(B, C)`` probability rows (each on the simplex).
        temperature: ``τ > 0``.

    Returns:
        Scalar tensor (float32, or float64 for float64 logits), differentiable w.r.t. ``logits``.

    Raises:
        ValueError: shapes that are not both ``(B, C)`` and equal, or ``τ <= 0``.
    """
    _check_temperature(temperature)
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(
            "logits and targets must both be (B, C) with equal shapes, "
            f"got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    dtype = _compute_dtype(logits)
    # Targets join the logits' compute dtype: a bf16 target row would no longer sum to 1.
    return F.cross_entropy(logits.to(dtype) / temperature, targets.to(dtype)) * (temperature * temperature)


def distillation_loss(
    logits: torch.Tensor,
    targets: torch.Tensor | None,
    labels: torch.Tensor | None,
    temperature: float = 1.0,
    alpha: float = 0.0,
) -> torch.Tensor:
    """``α · CE(logits, labels) + (1 − α) · soft_cross_entropy(logits, targets, τ)``.

    The hard term is ordinary cross-entropy at ``τ = 1``. A term whose weight is zero is not
    computed, so ``targets`` may be ``None`` when ``α == 1`` (generation 0, one-hot training) and
    ``labels`` may be ``None`` when ``α == 0``.

    Args:
        logits: ``(B, C)`` student scores, any float dtype (bf16/fp16 are computed in float32).
        targets: ``(B, C)`` probability rows, or ``None`` when ``alpha == 1``.
        labels: ``(B,)`` int64 class ids, or ``None`` when ``alpha == 0``.
        temperature: ``τ > 0`` for the soft term.
        alpha: weight ``α`` in ``[0, 1]`` of the hard term.

    Returns:
        Scalar tensor (float32, or float64 for float64 logits), differentiable w.r.t. ``logits``.

    Raises:
        ValueError: ``α`` outside ``[0, 1]``, ``τ <= 0``, a needed input that is ``None``, or
            shapes that disagree.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_temperature(temperature)
    dtype = _compute_dtype(logits)
    loss = logits.new_zeros((), dtype=dtype)
    if alpha > 0.0:
        if labels is None:
            raise ValueError(f"alpha={alpha} needs labels for the hard cross-entropy term")
        if logits.ndim != 2 or labels.shape != logits.shape[:1]:
            raise ValueError(
                f"labels must be (B,) for logits (B, C), got {tuple(labels.shape)} and {tuple(logits.shape)}"
            )
        loss = loss + alpha * F.cross_entropy(logits.to(dtype), labels)
    if alpha < 1.0:
        if targets is None:
            raise ValueError(f"alpha={alpha} needs soft targets; pass targets or set alpha=1")
        loss = loss + (1.0 - alpha) * soft_cross_entropy(logits, targets, temperature)
    return loss
