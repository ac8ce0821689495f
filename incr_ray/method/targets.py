"""Training targets a student learns from: the teacher's probabilities pushed toward the true class.

The target rule of the method as vectorised numpy, the temperature softmax of the
teacher's logits, and what the rule did to a batch (:func:`target_rule_stats`, additive like the
holdout metrics). It imports neither ray nor transformers so it can be tested directly and
called from any Ray worker.

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


def _check_rule(threshold: float, floor: float | None) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if floor is not None and not 0.0 <= floor < threshold:
        raise ValueError(f"floor must be in [0, threshold={threshold}) or None, got {floor}")


def rule_branches(q_c: np.ndarray, threshold: float, floor: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which branch of the target rule each row takes, from the teacher's probability of the
    true class: ``(kept, floored, pushed)`` boolean ``(n,)`` masks, exactly one true per row.

    kept: ``q_c >= p``; floored: ``f`` set and ``q_c < f`` (and not kept); pushed: the rest.
    """
    q_c = np.asarray(q_c, dtype=np.float64)
    keep = q_c >= threshold
    hard = ~keep & (q_c < floor) if floor is not None else np.zeros(q_c.shape, dtype=bool)
    return keep, hard, ~keep & ~hard


def soft_targets(probs, labels, threshold: float = 0.9, floor: float | None = None) -> np.ndarray:
    """Build each row's training target from the teacher's probabilities and the true class.

    With ``q`` a row of ``probs``, ``c`` its label, ``p = threshold`` and ``f = floor``:

    - ``q_c >= p``: ``t = q`` (the teacher already agrees enough; keep its whole distribution);
    - else, if ``f`` is set and ``q_c < f``: ``t = one_hot(c)`` (too wrong to learn from);
    - else: ``t_c = p`` and ``t_j = q_j * (1 - p) / (1 - q_c)`` for ``j != c`` — the wrong
      classes shrink in proportion and the correct one rises to ``p``.

    With ``threshold == 1`` every row with ``q_c < 1`` gets ``t_c = 1`` and zeros elsewhere.
    Classes the teacher was never trained on (an extension that adds labels) come in as zero
    columns (:func:`padded_probs`): their rows are pushed, or one-hot under a floor ``f > 0``.
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
    _check_rule(threshold, floor)
    probs, labels = check_prob_rows(probs, labels)
    n = probs.shape[0]
    if n == 0:
        return probs.copy()

    rows = np.arange(n)
    q_c = probs[rows, labels]
    keep, hard, push = rule_branches(q_c, threshold, floor)

    # Pushed rows have q_c < p <= 1, so 1 - q_c > 0; the other rows get a dummy denominator so
    # that q_c == 1 never divides by zero.
    denom = np.where(push, 1.0 - q_c, 1.0)
    scale = np.where(push, (1.0 - threshold) / denom, 1.0)
    targets = probs * scale[:, None]
    targets[rows[push], labels[push]] = threshold
    targets[hard] = 0.0
    targets[rows[hard], labels[hard]] = 1.0
    return targets


def padded_probs(probs, num_classes: int) -> np.ndarray:
    """The teacher's probabilities over the classes it knows, padded with zeros for classes added
    after it was trained (``incr-ray extend --allow-new-labels``; new ids are appended, so they
    are the last columns).

    :func:`soft_targets` on the padded rows is the method's rule for new classes, with no new
    formula (docs/method.md, "New classes"): a row of a new class ``c`` has ``q_c = 0 < p``, so
    it is pushed — ``t_c = p`` and the teacher's old-class distribution scaled by ``(1 − p)``; old-class rows
    get exactly the targets they would have got unpadded (and zeros in the new columns). With a
    floor ``f > 0`` every new-class row is below it (``q_c = 0 < f``) and its target is the
    one-hot label; ``f = 0`` floors nothing, so there the rows are pushed as above.

    Args:
        probs: ``(n, C_old)`` the teacher's probabilities.
        num_classes: ``C ≥ C_old``, the classes the student learns.

    Returns:
        ``(n, C)`` float64: ``probs`` followed by ``C − C_old`` zero columns (a float64 copy
        when ``C == C_old``).

    Raises:
        ValueError: ``probs`` not 2-D, or ``num_classes`` below its width.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (n, C), got shape {probs.shape}")
    known = probs.shape[1]
    if num_classes < known:
        raise ValueError(f"num_classes {num_classes} is below the teacher's {known} classes; "
                         "a label map only grows")
    out = np.zeros((probs.shape[0], num_classes), dtype=np.float64)
    out[:, :known] = probs
    return out


def ensemble_probs(member_probs, num_classes: int | None = None) -> np.ndarray:
    """The teacher of ``teacher.ensemble``: the mean of its members' probabilities, row by row.
    Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network") take the
    arithmetic or geometric mean of an ensemble's predictive distributions as its soft targets;
    this is the arithmetic one, which stays on the simplex without renormalising.

    A member trained before an extension added classes knows fewer of them: each member's rows are
    :func:`padded_probs` to ``num_classes`` first, so the mean gives a class a member never saw that
    member's 0, and the mean of rows on the simplex stays on it. Each member's probabilities are
    taken at the run's temperature τ before they are averaged (the softmax of each member at τ,
    as in the paper), never the softmax of averaged logits.

    Args:
        member_probs: ``m ≥ 1`` arrays ``(n, C_i)``, one per member, rows in the same order.
        num_classes: ``C ≥ max C_i``, the classes the student learns; None: the widest member's.

    Returns:
        ``(n, C)`` float64. With one member, exactly ``padded_probs`` of it.

    Raises:
        ValueError: no member, members that disagree on ``n``, or ``num_classes`` below a member's width.
    """
    members = [np.asarray(p, dtype=np.float64) for p in member_probs]
    if not members:
        raise ValueError("an ensemble needs at least one member's probabilities")
    width = num_classes if num_classes is not None else max(p.shape[-1] for p in members)
    padded = [padded_probs(p, width) for p in members]
    rows = {p.shape[0] for p in padded}
    if len(rows) > 1:
        raise ValueError(f"ensemble members scored different numbers of rows {sorted(rows)}; score the same batch")
    if len(padded) == 1:
        return padded[0]
    return np.mean(np.stack(padded), axis=0)


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


# -log(0) would make one confidently wrong row dominate the mean NLL as inf (the same floor as
# incr_ray.method.metrics, which imports this module and so cannot be imported here).
NLL_PROB_FLOOR = 1e-12

RULE_STAT_KEYS = ("rows", "teacher_correct", "teacher_nll_sum", "kept", "pushed", "floored",
                  "target_entropy_sum")


def target_rule_stats(probs, labels, targets, threshold: float = 0.9, floor: float | None = None,
                      temperature: float = 1.0) -> dict[str, float]:
    """What the teacher and the target rule did on one batch, as additive sums.

    Sum the dicts of any number of batches with :func:`merge_rule_stats` (any order, any
    grouping) and call :func:`finalize_rule_stats` once.

    Args:
        probs: ``(n, C)`` the teacher's probabilities (at the run's temperature, as stored).
        labels: ``(n,)`` integer true classes in ``[0, C)``.
        targets: ``(n, C)`` the targets built from them (rows on the simplex).
        threshold, floor: the rule's ``p`` and ``f``, as in :func:`soft_targets`.
        temperature: the ``τ`` ``probs`` were taken at. The rule's branches use ``probs`` as
            they are; the NLL is of the ``τ = 1`` distribution (``softmax(τ · log q)``), so that
            it compares with the holdout NLL of the students.

    Returns:
        ``rows``; ``teacher_correct`` (argmax == label, first class on ties);
        ``teacher_nll_sum`` (``Σ −log max(q_c, 1e-12)``, ``q`` at ``τ = 1``); ``kept``
        (``q_c >= p``), ``pushed`` and ``floored`` (one-hot because ``q_c < f``) row counts,
        which add up to ``rows``;
        ``target_entropy_sum`` (``Σ −Σ_j t_j log t_j`` in nats, ``0 log 0 = 0``). Counts are
        ints, sums floats.

    Raises:
        ValueError: a parameter out of range, inputs that fail :func:`check_prob_rows`, or
            ``targets`` of another shape than ``probs``.
    """
    _check_rule(threshold, floor)
    probs, labels = check_prob_rows(probs, labels)
    targets = np.asarray(targets, dtype=np.float64)
    if targets.shape != probs.shape:
        raise ValueError(f"targets has shape {targets.shape} but probs has {probs.shape}; pass one target per row")
    n = probs.shape[0]
    if n == 0:
        return {k: 0.0 if k.endswith("_sum") else 0 for k in RULE_STAT_KEYS}
    rows = np.arange(n)
    q_c = probs[rows, labels]
    keep, hard, push = rule_branches(q_c, threshold, floor)
    q1_c = q_c if temperature == 1.0 else softmax(np.log(np.maximum(probs, 1e-300)) * temperature)[rows, labels]
    t = np.clip(targets, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)
    return {
        "rows": int(n),
        "teacher_correct": int((probs.argmax(axis=1) == labels).sum()),
        "teacher_nll_sum": float(-np.log(np.maximum(q1_c, NLL_PROB_FLOOR)).sum()),
        "kept": int(keep.sum()),
        "pushed": int(push.sum()),
        "floored": int(hard.sum()),
        "target_entropy_sum": float(-plogp.sum()),
    }


def merge_rule_stats(stats_list) -> dict[str, float]:
    """Sum :func:`target_rule_stats` dicts key by key.

    Raises:
        ValueError: an empty list, or a dict without exactly the keys of :data:`RULE_STAT_KEYS`.
    """
    stats_list = list(stats_list)
    if not stats_list:
        raise ValueError("merge_rule_stats needs at least one batch of statistics")
    total: dict[str, float] = {}
    for i, stats in enumerate(stats_list):
        if set(stats) != set(RULE_STAT_KEYS):
            raise ValueError(f"statistics {i} has keys {sorted(stats)}, expected {sorted(RULE_STAT_KEYS)}")
        for k in RULE_STAT_KEYS:
            value = np.asarray(stats[k]).reshape(-1)[0].item()
            total[k] = total.get(k, 0) + value
    return total


def finalize_rule_stats(stats: dict[str, float]) -> dict[str, float]:
    """Shares and means from summed :func:`target_rule_stats`.

    Returns:
        ``accuracy`` (the teacher's, on these rows), ``nll`` (its mean NLL of the true class),
        ``kept``, ``pushed``, ``floored`` (shares of the rows, summing to 1), ``target_entropy``
        (mean entropy of the targets in nats) and ``rows``, all floats.

    Raises:
        ValueError: no rows.
    """
    n = float(np.asarray(stats["rows"]).reshape(-1)[0])
    if n == 0:
        raise ValueError("no rows to summarise; the block is empty")

    def mean(key: str) -> float:
        return float(np.asarray(stats[key]).reshape(-1)[0]) / n

    return {
        "accuracy": mean("teacher_correct"),
        "nll": mean("teacher_nll_sum"),
        "kept": mean("kept"),
        "pushed": mean("pushed"),
        "floored": mean("floored"),
        "target_entropy": mean("target_entropy_sum"),
        "rows": n,
    }
