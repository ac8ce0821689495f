"""Suspected label errors: rows whose teacher gives the labelled class less than ``below``.

Every generation from 1 on has a teacher that scores every row of its block anyway; a row whose
label that teacher contradicts with confidence is the first place to look for label noise. This
module is the arithmetic: which rows are suspects, in what order to show them (the most
confident contradiction first), and what the student trains on for them (``method.suspects``):

- ``keep``: the target rule as for every row (it pushes the labelled class up to ``p``);
- ``one_hot``: the label alone, as if the teacher had not spoken;
- ``drop``: the row is left out of training.

Plain numpy, like :mod:`incr_ray.method.targets`.
"""

from __future__ import annotations

import numpy as np

from .targets import check_prob_rows, softmax

POLICIES = ("keep", "one_hot", "drop")
# What each policy does with the suspects, as the console, the model card and the CLI say it.
TREATED = {"keep": "trained on the target rule like every row", "one_hot": "trained on their label alone",
           "drop": "left out of training"}


def at_unit_temperature(probs, temperature: float) -> np.ndarray:
    """The teacher's own (``τ = 1``) distribution from probabilities stored at ``τ``:
    ``softmax(τ · log q)``. Suspects are judged on it whatever ``method.temperature`` is."""
    probs = np.asarray(probs, dtype=np.float64)
    if temperature == 1.0 or not len(probs):
        return probs
    return softmax(np.log(np.maximum(probs, 1e-300)) * temperature)


def suspect_mask(probs, labels, below: float, temperature: float = 1.0, teacher_classes: int | None = None) -> np.ndarray:
    """``(n,)`` bool: the teacher's probability of the labelled class (at ``τ = 1``; ``probs`` are
    stored at ``temperature``) is below ``below`` (0: none is).

    ``teacher_classes``: how many classes the teacher was trained on, when an extension added
    more (their columns of ``probs`` are zero padding): a row of a class the teacher never saw is
    no suspect — its 0 says nothing about the label."""
    if not 0.0 <= below < 1.0:
        raise ValueError(f"below must be in [0, 1), got {below}")
    probs, labels = check_prob_rows(at_unit_temperature(probs, temperature), labels)
    known = labels < (teacher_classes if teacher_classes is not None else probs.shape[1])
    return (probs[np.arange(len(labels)), labels] < below) & known


def contradiction(probs, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the teacher's top class, its probability, and the labelled class's probability."""
    probs, labels = check_prob_rows(probs, labels)
    top = probs.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    rows = np.arange(len(labels))
    return top, probs[rows, top], probs[rows, labels]


def most_confident_first(label_prob: np.ndarray, top_prob: np.ndarray, row_id: np.ndarray) -> np.ndarray:
    """The order to list suspects in: the labelled class's probability ascending (the surest
    contradiction first), then the top class's probability descending, then the row id."""
    return np.lexsort((np.asarray(row_id), -np.asarray(top_prob), np.asarray(label_prob)))


def apply_policy(targets: np.ndarray, labels, suspect: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, kept)``: the training targets under ``policy`` and which rows stay in training.

    ``keep`` returns the targets as they are; ``one_hot`` replaces the suspects' rows by their
    one-hot label; ``drop`` marks them out of ``kept`` (their targets untouched)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    targets = np.array(targets, dtype=np.float64, copy=True)
    labels = np.asarray(labels, dtype=np.int64)
    suspect = np.asarray(suspect, dtype=bool)
    kept = np.ones(len(labels), dtype=bool)
    if policy == "one_hot" and suspect.any():
        targets[suspect] = 0.0
        targets[np.flatnonzero(suspect), labels[suspect]] = 1.0
    elif policy == "drop":
        kept = ~suspect
    return targets, kept
