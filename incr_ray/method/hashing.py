"""Seeded hashing: row ids, the holdout/block split, training order, sampling, derived seeds.

Every random choice that depends on rows is a pure function of a row id and the run's seed, so it
comes out the same whatever order or grouping Ray Data delivers the rows in. Plain numpy.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

HOLDOUT = -1  # the block of a held-out row


def generation_seed(run_seed: int, generation: int) -> int:
    """The one seed of generation ``generation``: its training order, replay sample and the
    Trainer's torch seed all derive from it."""
    return run_seed * 1000 + generation


def _salt(seed: int, purpose: str) -> np.uint64:
    """A 64-bit salt per (seed, purpose), so the holdout, block and sample hashes are independent."""
    digest = hashlib.blake2b(f"{seed}:{purpose}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijection on uint64 that mixes every input bit into every output bit."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def unit(h: np.ndarray) -> np.ndarray:
    """Map 64-bit hashes to floats uniform in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_ids(ids: np.ndarray, seed: int, purpose: str) -> np.ndarray:
    return splitmix64(np.asarray(ids, dtype=np.int64).view(np.uint64) ^ _salt(seed, purpose))


def row_ids(texts: Sequence[str], raw_labels: Sequence) -> np.ndarray:
    """Stable 63-bit ids (int64, ≥ 0): blake2b of ``text + '\\x1f' + str(label)``.

    The id is the row's identity across runs, machines and files. Identical (text, label) rows
    share an id: they are the same example, never straddle the train/holdout boundary and, within
    a Ray batch, land in the same block. The label 1 and the label "1" are the same (a label's name
    is its str).
    """
    if len(texts) != len(raw_labels):
        raise ValueError(f"row_ids: {len(texts)} texts but {len(raw_labels)} labels")

    def one(text, label) -> int:
        key = ("" if text is None else text) + "\x1f" + ("" if label is None else str(label))
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1  # 63 bits: a non-negative int64

    return np.fromiter((one(t, y) for t, y in zip(texts, raw_labels)), dtype=np.int64, count=len(texts))


def assign_split(ids: np.ndarray, seed: int, k: int, eval_fraction: float) -> np.ndarray:
    """Block per row (int64): 0 … k-1, or -1 for the holdout. Pure and vectorised.

    ``ids``: int64 row ids of one batch, shape (n,). A row is held out when a per-row hash,
    uniform in [0, 1), is below ``eval_fraction`` — the same decision whatever batch the row is in.
    The remaining rows are ranked by a second per-row hash and dealt round-robin over the k blocks,
    starting at an offset taken from the batch (its smallest hash mod k), so every batch fills the
    blocks to within one row of each other and no block is favoured across batches. Equal ids get
    equal ranks, hence the same block. Deterministic for the same batch content and seed.
    """
    if k < 1:
        raise ValueError(f"assign_split: k must be ≥ 1 (got {k})")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"assign_split: eval_fraction must be in [0, 1) (got {eval_fraction})")
    ids = np.asarray(ids, dtype=np.int64)
    blocks = np.full(ids.shape[0], HOLDOUT, dtype=np.int64)
    train = unit(hash_ids(ids, seed, "holdout")) >= eval_fraction
    if train.any():
        h = hash_ids(ids[train], seed, "block")
        # splitmix64 is a bijection, so equal hashes mean equal ids: they share a rank.
        distinct, rank = np.unique(h, return_inverse=True)
        offset = int(distinct[0] % np.uint64(k))
        blocks[train] = (offset + rank.reshape(-1)) % k
    return blocks


def shuffle_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """Sort keys (int64) that put rows in a seeded random order depending on their ids alone.

    Sorting by these keys gives the same order whatever blocks the rows arrive in and in whatever
    order; equal ids (identical rows) get equal keys.
    """
    return hash_ids(ids, seed, "order").view(np.int64)


def sample_mask(ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Keep-mask for a seeded, unbiased per-row sample of about ``fraction`` of the rows."""
    return unit(hash_ids(ids, seed, "sample")) < fraction


def per_class_sample(ids: np.ndarray, labels: np.ndarray, seed: int, cap: int, purpose: str) -> np.ndarray:
    """Keep-mask for an exact seeded sample of ``min(cap, n_c)`` rows of every class c: the rows
    whose per-row hash (``purpose``: independent samples for independent uses) is among the
    ``cap`` smallest of their class, ties broken by row id.

    The choice depends on the rows' ids and classes only, not on their order, so a caller may
    stream: apply it to the rows kept so far plus the next batch, again and again. ``ids``
    distinct (a repeated id would take two places).
    """
    ids, labels = np.asarray(ids, dtype=np.int64), np.asarray(labels)
    keep = np.zeros(len(ids), dtype=bool)
    if cap <= 0 or len(ids) == 0:
        return keep
    keys = hash_ids(ids, seed, purpose)
    order = np.lexsort((ids, keys, labels))  # by class, then hash, then id
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")  # where each row's class starts
    keep[order[np.arange(len(ids)) - first < cap]] = True
    return keep



def validation_mask(ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Rows of the validation slice (``method.validation_fraction``): a per-row hash of the run's
    seed, so a row is in the slice in every generation and for replay alike — never trained on."""
    return unit(hash_ids(ids, seed, "validation")) < fraction


def retention_mask(ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Rows of the retention sample (earlier blocks scored again to show forgetting)."""
    return unit(hash_ids(ids, seed, "retention")) < fraction


def extension_holdout_mask(ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Rows of a new data file held out as that extension's own holdout (``extend --holdout-fraction``)."""
    return unit(hash_ids(ids, seed, "extension-holdout")) < fraction
