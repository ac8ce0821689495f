"""Herding: which rows of a class best stand for it in a small memory. Plain numpy.

Welling (2009, "Herding dynamical weights to learn") picks points one at a time so that the
running mean of the picks tracks a target mean; iCaRL (Rebuffi et al., CVPR 2017) uses it to choose
a class's exemplars on the network's L2-normalised features, and End-to-End Incremental Learning
(Castro et al., ECCV 2018) takes iCaRL's selection as it is. Pick k is the row that brings the
mean of the k picks closest to the class mean:

    p_k = argmin_x ‖ μ − (x + Σ_{j<k} p_j) / k ‖,   μ = mean of the class's features

The picks come in order: the first m of a budget-M memory are the best m-row memory herding gives
(iCaRL shrinks a memory by dropping its tail), and the distance of each prefix to μ says how well
the memory so far stands for its class.
"""

from __future__ import annotations

import numpy as np


def l2_normalised(features: np.ndarray) -> np.ndarray:
    """``(n, d)`` rows scaled to unit length (float64); an all-zero row stays zero."""
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def herding_order(features: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of one class herding picks, in the order it picks them.

    Args:
        features: ``(n, d)`` the class's rows' features (iCaRL's: L2-normalised, see
            :func:`l2_normalised`; used as given).
        budget: how many rows to pick, ≥ 0; ``min(budget, n)`` are picked.

    Returns:
        ``(picks, distances)``: ``picks`` ``(m,)`` int64 distinct row indices into ``features``,
        ``m = min(budget, n)``; ``distances`` ``(m,)`` float64, ``distances[k]`` =
        ‖μ − mean(features[picks[:k + 1]])‖, the distance of the first k+1 picks' mean to the
        class mean μ. Ties go to the lowest index, so the picks depend on the rows' order only
        through ties: give the rows in a fixed order (e.g. by row id) for a reproducible memory.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {x.shape}")
    if budget < 0:
        raise ValueError(f"budget must be ≥ 0, got {budget}")
    n = x.shape[0]
    m = min(budget, n)
    picks = np.empty(m, dtype=np.int64)
    distances = np.empty(m, dtype=np.float64)
    if m == 0:
        return picks, distances
    mu = x.mean(axis=0)
    sq_norms = np.einsum("ij,ij->i", x, x)
    taken = np.zeros(n, dtype=bool)
    chosen_sum = np.zeros_like(mu)
    for k in range(m):
        # ‖μ − (S + x)/(k+1)‖² · (k+1)² = ‖t − x‖², t = (k+1)·μ − S: one matrix-vector product a pick.
        t = (k + 1) * mu - chosen_sum
        cost = sq_norms - 2.0 * (x @ t)
        cost[taken] = np.inf
        best = int(np.argmin(cost))
        picks[k], taken[best] = best, True
        chosen_sum += x[best]
        distances[k] = float(np.linalg.norm(mu - chosen_sum / (k + 1)))
    return picks, distances


def class_memory(features: np.ndarray, labels: np.ndarray, budget: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Herding within every class of a candidate pool.

    Args:
        features: ``(n, d)`` the candidates' features, rows in a fixed order.
        labels: ``(n,)`` int class of each candidate.
        budget: exemplars per class (a class with fewer candidates gives all of them).

    Returns:
        ``(index, rank, distance)``, each ``(m,)``, m = Σ_c min(budget, n_c): the picked rows'
        indices into the pool, grouped by class in ascending class order and within a class in
        herding order; each pick's rank in its class (0 = first picked); and its
        :func:`herding_order` distance.
    """
    labels = np.asarray(labels)
    if len(labels) != len(features):
        raise ValueError(f"{len(features)} feature rows but {len(labels)} labels")
    index, rank, distance = [], [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        picks, dist = herding_order(np.asarray(features)[members], budget)
        index.append(members[picks])
        rank.append(np.arange(len(picks), dtype=np.int64))
        distance.append(dist)
    if not index:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64)
    return np.concatenate(index), np.concatenate(rank), np.concatenate(distance)
