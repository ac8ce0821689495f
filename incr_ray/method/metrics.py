"""Holdout metrics (accuracy, macro-F1, NLL, ECE) built from additive per-batch statistics.

A distributed evaluation computes :func:`batch_stats` on each batch wherever the batch lives,
adds them with :func:`merge_stats` (any order, any grouping), and calls :func:`finalize` once.
Every statistic is a count or a sum, so the merged result equals the statistics of the whole
set exactly (up to float summation order). :func:`old_new_split` turns the per-class counts
(the confusion matrix's diagonal and row sums) into the figures of a run whose label map grew:
old-class and new-class accuracy, recall per class, forgetting. Plain numpy: no ray, no torch.

Shapes: ``n`` rows, ``C`` classes, ``B`` calibration bins.
"""

from __future__ import annotations

import numpy as np

from .targets import check_prob_rows

# log(0) would make a single confident mistake dominate the mean NLL as inf.
NLL_PROB_FLOOR = 1e-12

STAT_KEYS = ("n", "confusion", "nll_sum", "bin_count", "bin_conf_sum", "bin_correct_sum")


def batch_stats(probs, labels, num_bins: int = 15) -> dict[str, np.ndarray]:
    """Additive statistics of one batch of predicted probabilities.

    The prediction is the argmax (first class on ties), the confidence its probability. Bin ``b``
    holds confidences in ``[b/B, (b+1)/B)``, except that confidence 1.0 goes to the last bin.

    Args:
        probs: ``(n, C)`` predicted probability rows.
        labels: ``(n,)`` integer true classes in ``[0, C)``.
        num_bins: ``B >= 1`` equal-width confidence bins over ``[0, 1]``.

    Returns:
        ``n`` ``(1,)`` int64; ``confusion`` ``(C, C)`` int64 counts indexed ``[true, pred]``;
        ``nll_sum`` ``(1,)`` float64, ``Σ −log max(q_c, 1e-12)``; ``bin_count`` ``(B,)`` int64;
        ``bin_conf_sum`` ``(B,)`` float64; ``bin_correct_sum`` ``(B,)`` int64.

    Raises:
        ValueError: ``num_bins < 1`` or inputs that fail :func:`incr_ray.method.targets.check_prob_rows`.
    """
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}")
    probs, labels = check_prob_rows(probs, labels)
    n, num_classes = probs.shape
    rows = np.arange(n)
    pred = probs.argmax(axis=1) if n else np.zeros(0, dtype=np.int64)
    conf = probs[rows, pred]
    correct = (pred == labels).astype(np.int64)
    # Rows may sum to 1 + 1e-4, so a confidence can exceed 1 slightly; clip keeps it in the last bin.
    bins = np.clip(np.floor(conf * num_bins).astype(np.int64), 0, num_bins - 1)
    return {
        "n": np.array([n], dtype=np.int64),
        "confusion": np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
        .astype(np.int64)
        .reshape(num_classes, num_classes),
        "nll_sum": np.array([-np.log(np.maximum(probs[rows, labels], NLL_PROB_FLOOR)).sum()]),
        "bin_count": np.bincount(bins, minlength=num_bins).astype(np.int64),
        "bin_conf_sum": np.bincount(bins, weights=conf, minlength=num_bins),
        "bin_correct_sum": np.bincount(bins, weights=correct, minlength=num_bins).astype(np.int64),
    }


def merge_stats(stats_list) -> dict[str, np.ndarray]:
    """Sum statistics from :func:`batch_stats` element by element.

    Args:
        stats_list: non-empty iterable of dicts with the keys and shapes of :func:`batch_stats`,
            all from the same ``C`` and ``num_bins``.

    Returns:
        One dict of the same keys and shapes.

    Raises:
        ValueError: an empty list, or dicts whose keys or shapes disagree.
    """
    stats_list = list(stats_list)
    if not stats_list:
        raise ValueError("merge_stats needs at least one batch of statistics")
    first = stats_list[0]
    if set(first) != set(STAT_KEYS):
        raise ValueError(f"statistics must have keys {sorted(STAT_KEYS)}, got {sorted(first)}")
    merged = {k: np.array(first[k], copy=True) for k in STAT_KEYS}
    for i, stats in enumerate(stats_list[1:], start=1):
        if set(stats) != set(STAT_KEYS):
            raise ValueError(f"statistics {i} has keys {sorted(stats)}, expected {sorted(STAT_KEYS)}")
        for k in STAT_KEYS:
            value = np.asarray(stats[k])
            if value.shape != merged[k].shape:
                raise ValueError(
                    f"statistics {i} has {k} of shape {value.shape}, expected {merged[k].shape}; "
                    "use the same class count and num_bins everywhere"
                )
            merged[k] = merged[k] + value
    return merged


def finalize(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """Turn summed statistics into the reported metrics.

    - ``accuracy``: correct / n.
    - ``macro_f1``: mean over classes of ``F1_k = 2·TP_k / (support_k + predicted_k)`` (equal to
      ``2PR/(P+R)``, and 0 when TP is 0). A class with no true rows *and* no predicted rows has
      an undefined F1 and nothing to say about the model, so it is left out of the mean rather
      than counted as 0 or 1; a class that was predicted but never true (or the reverse) counts
      as 0.
    - ``nll``: mean negative log-likelihood of the true class.
    - ``ece``: ``Σ_b |acc_b − conf_b| · n_b / n``, i.e. ``Σ_b |correct_b − conf_sum_b| / n``.
    - ``n``: number of rows.

    Args:
        stats: a dict from :func:`batch_stats` or :func:`merge_stats`.

    Returns:
        ``{"accuracy", "macro_f1", "nll", "ece"}`` as floats and ``"n"`` as int.

    Raises:
        ValueError: ``n == 0`` (no metric is defined on an empty set).
    """
    n = int(np.asarray(stats["n"]).reshape(-1)[0])
    if n == 0:
        raise ValueError("no rows to evaluate; the holdout split is empty")
    confusion = np.asarray(stats["confusion"], dtype=np.float64)
    tp = np.diag(confusion)
    support_plus_pred = confusion.sum(axis=1) + confusion.sum(axis=0)
    seen = support_plus_pred > 0
    f1 = 2.0 * tp[seen] / support_plus_pred[seen]
    # n_b·acc_b is the bin's correct count and n_b·conf_b its confidence sum, so no division per bin.
    bin_correct = np.asarray(stats["bin_correct_sum"], dtype=np.float64)
    ece = np.abs(bin_correct - np.asarray(stats["bin_conf_sum"], dtype=np.float64)).sum() / n
    return {
        "accuracy": float(tp.sum() / n),
        "macro_f1": float(f1.mean()),
        "nll": float(np.asarray(stats["nll_sum"]).reshape(-1)[0] / n),
        "ece": float(ece),
        "n": n,
    }


def probs_metrics(probs, labels, num_bins: int = 15) -> dict[str, float]:
    """:func:`finalize` of one set of probability rows (a slice small enough to hold at once)."""
    return finalize(batch_stats(probs, labels, num_bins))


def flip_rates(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
               truth: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """How predictions changed between two models on the same rows.

    Args:
        before, after, truth: ``(row_ids, classes)`` pairs — two models' predicted classes and the
            true labels — each in any order; identical rows share an id (and a label).

    Returns:
        ``flip_rate``: share of rows ``before`` got right and ``after`` gets wrong (forgetting, in
        the continual-learning sense); ``fix_rate``: wrong before, right after; ``rows`` compared.
    """
    def by_id(pair):
        ids, values = (np.asarray(a, dtype=np.int64) for a in pair)
        unique, first = np.unique(ids, return_index=True)
        return unique, values[first]

    ids, labels = by_id(truth)
    b_ids, b_pred = by_id(before)
    a_ids, a_pred = by_id(after)
    common = np.intersect1d(np.intersect1d(ids, b_ids), a_ids)
    if len(common) == 0:
        return {"flip_rate": float("nan"), "fix_rate": float("nan"), "rows": 0}
    y = labels[np.searchsorted(ids, common)]
    right_before = b_pred[np.searchsorted(b_ids, common)] == y
    right_after = a_pred[np.searchsorted(a_ids, common)] == y
    return {"flip_rate": float((right_before & ~right_after).mean()),
            "fix_rate": float((~right_before & right_after).mean()), "rows": int(len(common))}


def class_counts(labels, preds, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and correct predictions per true class.

    Args:
        labels: ``(n,)`` integer true classes in ``[0, C)``.
        preds: ``(n,)`` integer predicted classes (any value; one outside ``[0, C)`` is wrong).
        num_classes: ``C``.

    Returns:
        ``(rows, correct)``, each ``(C,)`` int64: rows of class ``c``, and of those predicted ``c``
        (the diagonal of the confusion matrix; its row sums are ``rows``).
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    preds = np.asarray(preds, dtype=np.int64).reshape(-1)
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds must have the same length, got {len(labels)} and {len(preds)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes})")
    rows = np.bincount(labels, minlength=num_classes).astype(np.int64)
    correct = np.bincount(labels[labels == preds], minlength=num_classes).astype(np.int64)
    return rows, correct


def _share(hits, total) -> float | None:
    return float(hits / total) if total else None


def old_new_split(rows, correct, old_classes, correct_before=None) -> dict:
    """Class-incremental figures on one holdout: accuracy on the old classes, on the new ones and
    overall, each class's recall, and the forgetting of the old classes against an earlier model.

    A row of a class the earlier model does not know counts as wrong for it (its head has no such
    class); only old-class rows enter the forgetting, so that never matters there.

    Args:
        rows: ``(C,)`` rows per true class (:func:`class_counts`, or a confusion matrix's row sums).
        correct: ``(C,)`` of those the model predicted right (the confusion matrix's diagonal).
        old_classes: the class ids known before the classes were added; every other id is new.
        correct_before: ``(C,)`` the earlier model's correct rows, on the same rows; optional.

    Returns:
        ``rows``, ``accuracy``; ``old_rows``, ``old_accuracy``; ``new_rows``, ``new_accuracy``;
        ``recall`` ``(C,)`` list; with ``correct_before`` also ``old_accuracy_before`` and
        ``forgetting`` = ``old_accuracy_before − old_accuracy`` (positive: the old classes lost
        accuracy; Chaudhry et al. 2018's sign). A share over no rows is None.

    Raises:
        ValueError: shapes that disagree, an old class id outside ``[0, C)``, or more correct
            rows than rows.
    """
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    correct = np.asarray(correct, dtype=np.int64).reshape(-1)
    num_classes = len(rows)
    old = np.zeros(num_classes, dtype=bool)
    ids = np.asarray(list(old_classes), dtype=np.int64)
    if len(ids) and (ids.min() < 0 or ids.max() >= num_classes):
        raise ValueError(f"old_classes must be class ids in [0, {num_classes}), got {sorted(set(ids.tolist()))}")
    old[ids] = True
    checked = [("correct", correct)] + ([] if correct_before is None else [("correct_before", correct_before)])
    for name, values in checked:
        values = np.asarray(values).reshape(-1)
        if values.shape != rows.shape:
            raise ValueError(f"{name} must have shape {rows.shape} like rows, got {values.shape}")
        if (values > rows).any() or (values < 0).any():
            raise ValueError(f"{name} must lie between 0 and rows for every class")
    out = {
        "rows": int(rows.sum()), "accuracy": _share(correct.sum(), rows.sum()),
        "old_rows": int(rows[old].sum()), "old_accuracy": _share(correct[old].sum(), rows[old].sum()),
        "new_rows": int(rows[~old].sum()), "new_accuracy": _share(correct[~old].sum(), rows[~old].sum()),
        "recall": [_share(c, r) for c, r in zip(correct, rows)],
    }
    if correct_before is not None:
        before = _share(np.asarray(correct_before, dtype=np.int64)[old].sum(), rows[old].sum())
        out["old_accuracy_before"] = before
        out["forgetting"] = None if before is None else before - out["old_accuracy"]
    return out
