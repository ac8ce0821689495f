"""Training targets a student learns from: the teacher's probabilities pushed toward the true class.

The target rule of the method as vectorised numpy, plus the temperature softmax of the
teacher's logits. It imports neither ray nor
transformers so it can be tested directly and called from any Ray worker.

Shapes: ``n`` rows, ``C`` classes.
"""

from __future__ import annotations

import numpy as np

# Softmax outputs in float32 sum to 1 within ~1e-6; anything looser than this is not a
# probability vector (most often raw logits passed by mistake).
ROW_SUM_TOLERANCE = 1e-4


def check_labels(labels, num_classes: int, name: str = "labels") -> np.ndarray:
    """Validate class ids and return them as int64.

    Args:
        labels: ``(n,)`` integer class ids.
        num_classes: ``C``; every id must lie in ``[0, C)``.
        name: what to call the array in error messages.

    Returns:
        ``(n,)`` int64 (the input itself when it already is).

    Raises:
        ValueError: not 1-D, not an integer dtype, or an id outside ``[0, C)``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D (n,), got shape {labels.shape}")
    # An empty Python list arrives as float64; it holds no non-integer, so let it through.
    if labels.size == 0:
        return labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{name} must be integer class ids, got dtype {labels.dtype}; map label names to ids first"
        )
    if labels.min() < 0 or labels.max() >= num_classes:
        bad = labels[(labels < 0) | (labels >= num_classes)][0]
        raise ValueError(f"{name} must lie in [0, {num_classes}), found {int(bad)}; check the label map")
    return labels.astype(np.int64, copy=False)


def check_prob_rows(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validate a batch of probability rows and their true classes.

    Args:
        probs: ``(n, C)`` rows on the probability simplex.
        labels: ``(n,)`` integer class ids in ``[0, C)``.

    Returns:
        ``(probs as float64 (n, C), labels as int64 (n,))``.

    Raises:
        ValueError: wrong ranks, lengths that disagree, bad labels, or a row that is not a
            probability vector (negative, NaN/inf, or sum off 1 by more than 1e-4).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, C), got shape {probs.shape}")
    labels_arr = np.asarray(labels)
    if labels_arr.ndim == 1 and labels_arr.shape[0] != probs.shape[0]:
        raise ValueError(
            f"probs has {probs.shape[0]} rows but labels has {labels_arr.shape[0]}; pass one label per row"
        )
    labels = check_labels(labels_arr, probs.shape[1])
    if probs.shape[0] == 0:
        return probs, labels
    if not np.isfinite(probs).all():
        row = int(np.argwhere(~np.isfinite(probs))[0, 0])
        raise ValueError(f"probs row {row} holds NaN or inf; the teacher's output is broken")
    if (probs < 0).any():
        row = int(np.argwhere(probs < 0)[0, 0])
        raise ValueError(f"probs row {row} has a negative entry; pass softmax probabilities, not logits")
    off = np.abs(probs.sum(axis=1) - 1.0)
    if (off > ROW_SUM_TOLERANCE).any():
        row = int(np.argmax(off > ROW_SUM_TOLERANCE))
        raise ValueError(
            f"probs row {row} sums to {probs[row].sum():.6g}, not 1; pass softmax probabilities, not logits"
        )
    return probs, labels


def soft_targets(probs, labels, threshold: float = 0.9, floor: float | None = None) -> np.ndarray:
    """Build each row's training target from the teacher's probabilities and the true class.

    With ``q`` a row of ``probs``, ``c`` its label, ``p = threshold`` and ``f = floor``:

    - ``q_c >= p``: ``t = q`` (the teacher already agrees enough; keep its whole distribution);
    - else, if ``f`` is set and ``q_c < f``: ``t = one_hot(c)`` (too wrong to learn from);
    - else: ``t_c = p`` and ``t_j = q_j * (1 - p) / (1 - q_c)`` for ``j != c`` — the wrong
      classes shrink in proportion and the correct one rises to ``p``.

    With ``threshold == 1`` every row with ``q_c < 1`` gets ``t_c = 1`` and zeros elsewhere.
    No renormalisation is done, so kept rows equal ``q`` exactly and every row sums to 1 as
    closely as its input row did.

    Args:
        probs: ``(n, C)`` teacher probabilities, rows on the simplex (sums within 1e-4 of 1).
        labels: ``(n,)`` integer true classes in ``[0, C)``.
        threshold: ``p`` in ``(0, 1]``.
        floor: ``f`` in ``[0, threshold)``, or ``None`` for no floor.

    Returns:
        ``(n, C)`` float64 targets; ``(0, C)`` when ``n == 0``.

    Raises:
        ValueError: a parameter out of range or inputs that fail :func:`check_prob_rows`.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if floor is not None and not 0.0 <= floor < threshold:
        raise ValueError(f"floor must be in [0, threshold={threshold}) or None, got {floor}")
    probs, labels = check_prob_rows(probs, labels)
    n = probs.shape[0]
    if n == 0:
        return probs.copy()

    rows = np.arange(n)
    q_c = probs[rows, labels]
    keep = q_c >= threshold
    hard = ~keep & (q_c < floor) if floor is not None else np.zeros(n, dtype=bool)
    push = ~keep & ~hard

    # Pushed rows have q_c < p <= 1, so 1 - q_c > 0; the other rows get a dummy denominator so
    # that q_c == 1 never divides by zero.
    denom = np.where(push, 1.0 - q_c, 1.0)
    scale = np.where(push, (1.0 - threshold) / denom, 1.0)
    targets = probs * scale[:, None]
    targets[rows[push], labels[push]] = threshold
    targets[hard] = 0.0
    targets[rows[hard], labels[hard]] = 1.0
    return targets


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """Temperature-softened softmax over the last axis, computed stably in float64.

    Args:
        logits: ``(n, C)`` raw scores (any leading shape works; the softmax is over the last axis).
        temperature: ``τ > 0``; ``τ > 1`` flattens the distribution, ``τ < 1`` sharpens it.

    Returns:
        ``(n, C)`` float64 probabilities, each row summing to 1.

    Raises:
        ValueError: ``temperature`` not a positive finite number.
    """
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature
    # Shifting by the row max keeps exp() from overflowing; the result is unchanged.
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
