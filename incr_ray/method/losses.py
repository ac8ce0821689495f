"""The student's training loss: cross-entropy against soft targets, with temperature and a hard-label mix,
and the elastic weight consolidation penalty.

``soft_cross_entropy`` is the method's loss (a student against the targets built by
:func:`incr_ray.method.targets.soft_targets`); ``distillation_loss`` adds Hinton et al.'s optional
``α · hard CE`` term; ``ewc_penalty`` is Kirkpatrick et al.'s quadratic pull towards the teacher's
weights (``method.ewc``). All are plain torch functions with no ray or transformers import, so the
training loop only runs the forward pass and calls them.

Shapes: ``B`` rows in the batch, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def ewc_penalty(deltas: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor], strength: float) -> torch.Tensor:
    """Elastic weight consolidation (Kirkpatrick et al., 2017): ``λ/2 · Σ_i F_i · (θ_i − θ*_i)²``.

    ``θ*`` are the weights of the model the Fisher information ``F`` was estimated on (the
    teacher); a weight that mattered for its data (large ``F_i``) is held near its old value, one
    that did not is free. The gradient with respect to ``θ`` is ``λ · F · (θ − θ*)``.

    Args:
        deltas: one tensor per weight, ``θ − θ*``, any shape and float dtype, differentiable
            (under LoRA an adapted weight's ``θ − θ*`` is the adapter's ``scale · B·A``).
        fisher: the diagonal Fisher information ``F ≥ 0`` of each weight, the shape of its delta.
        strength: ``λ ≥ 0``.

    Returns:
        Scalar tensor on the deltas' device, float32 (float64 when a delta is float64);
        ``torch.zeros(())`` for no deltas.

    Raises:
        ValueError: ``λ < 0``, lengths that differ, or a Fisher tensor of another shape than its delta.
    """
    if not strength >= 0.0:
        raise ValueError(f"strength (λ) must be ≥ 0, got {strength}")
    if len(deltas) != len(fisher):
        raise ValueError(f"{len(deltas)} deltas but {len(fisher)} Fisher tensors")
    if not deltas:
        return torch.zeros(())
    total = None
    for delta, f in zip(deltas, fisher):
        if delta.shape != f.shape:
            raise ValueError(f"a Fisher tensor of shape {tuple(f.shape)} for a weight of shape {tuple(delta.shape)}")
        d = delta.to(torch.promote_types(delta.dtype, torch.float32))  # 16-bit squares lose the small deltas
        term = (f.to(d.dtype) * d * d).sum()
        total = term if total is None else total + term
    return 0.5 * strength * total
