"""Balanced fine-tuning's rows (``student.balanced_epochs``; End-to-End Incremental Learning,
Castro et al. 2018): of a generation's training rows (its block and its replay), a seeded sample of
as many rows of every class — ``replay.per_class`` when the run keeps a per-class memory, else the
smallest class's count — chosen on the driver from the rows' ids and labels. The workers train on
them after the main steps, in the same fit (:func:`incr_ray.generation.student.fit_student`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import Config
from ..data import rows_with_ids
from ..generation.trainer import steps_for
from ..method.hashing import generation_seed, per_class_sample

BALANCED_PURPOSE = "balanced"  # its per-row hash, independent of the memory's and the replay's


@dataclass(frozen=True)
class BalancedSet:
    """What balanced fine-tuning trains on: the row ids, the cap per class, their rows and steps."""

    ids: np.ndarray
    per_class: int
    rows: int
    steps: int


def balanced_cap(counts: np.ndarray, per_class: int) -> int:
    """Rows per class of the balanced set: ``per_class`` (the memory's budget) when set, else the
    smallest count of a class that has rows."""
    if per_class > 0:
        return per_class
    counts = np.asarray(counts)
    return int(counts[counts > 0].min()) if (counts > 0).any() else 0


def choose_balanced(ids: np.ndarray, labels: np.ndarray, cfg: Config, g: int) -> tuple[np.ndarray, int]:
    """(the ids of the balanced set of generation ``g``'s training rows ``ids``/``labels``, in
    id order; the cap per class). A repeated row counts once."""
    ids, first = np.unique(np.asarray(ids, np.int64), return_index=True)
    labels = np.asarray(labels, np.int64)[first]
    cap = balanced_cap(np.bincount(labels), cfg.replay.per_class)
    keep = per_class_sample(ids, labels, generation_seed(cfg.run.seed, g), cap, BALANCED_PURPOSE)
    return ids[keep], cap


def balanced_set(cfg: Config, g: int, train_ds) -> tuple[BalancedSet, object] | None:
    """Generation ``g``'s balanced set and its rows (a dataset of ``train_ds``'s), or None when
    balanced fine-tuning is off (``student.balanced_epochs`` 0, or generation 0, which has no
    memory to balance). Reads the training rows' ids and labels once, on the driver."""
    s = cfg.student
    if s.balanced_epochs <= 0 or g == 0:
        return None
    parts = list(train_ds.select_columns(["row_id", "label"]).iter_batches(batch_size=65536, batch_format="numpy"))
    ids = np.concatenate([p["row_id"] for p in parts]) if parts else np.empty(0, np.int64)
    labels = np.concatenate([p["label"] for p in parts]) if parts else np.empty(0, np.int64)
    chosen, cap = choose_balanced(ids, labels, cfg, g)
    rows_ds = rows_with_ids(train_ds, chosen).materialize()
    rows = rows_ds.count()
    steps = steps_for(rows, cfg.cluster.workers, s.batch_size, s.balanced_epochs, s.grad_accum) if rows else 0
    return BalancedSet(chosen, cap, rows, steps), rows_ds


def balanced_line(g: int, chosen: BalancedSet, cfg: Config) -> str:
    """The console's line about generation ``g``'s balanced fine-tuning, said before it trains."""
    s = cfg.student
    return (f"[gen {g}] then balanced fine-tuning: {chosen.steps} optimizer steps on {chosen.rows} rows (up to "
            f"{chosen.per_class} a class) at learning rate {s.learning_rate * s.balanced_lr_factor:g}")
