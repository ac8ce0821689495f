"""Replay: rows of earlier blocks that join generation g's block, re-scored by the same teacher —
a small memory against forgetting when blocks drift.

Two ways to size it (``replay``): :func:`replay_rows`, a seeded sample of about ``fraction`` of the
block's size; or a per-class memory, whose candidates :func:`memory_candidates` chooses — an exact
seeded sample of each old class — and :func:`rows_with_ids` takes from the split.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data
from ray.data.expressions import col

from ..method.hashing import generation_seed, per_class_sample, sample_mask, validation_mask
from ..storage import parquet_batches
from .slices import rows_where

MEMORY_PURPOSE = "memory"  # the per-row hash of the memory's candidates (independent of the others)
BATCH = 65536


def replay_rows(split: "ray.data.Dataset", g: int, block_rows: int, fraction: float,
                block_sizes: list[int], run_seed: int) -> "ray.data.Dataset | None":
    """About ``fraction · block_rows`` rows sampled from blocks 0 … g-1 of ``split``; None when off."""
    if fraction <= 0:
        return None
    earlier = sum(block_sizes[:g])
    keep = min(1.0, fraction * block_rows / max(1, earlier))
    pool = split.filter(expr=(col("block") >= 0) & (col("block") < g))
    # A per-row-id hash, so the sample does not depend on how Ray Data cuts the dataset into blocks.
    return pool.map_batches(rows_where, batch_format="numpy",
                            fn_kwargs={"mask_fn": sample_mask, "seed": generation_seed(run_seed, g),
                                       "fraction": keep, "keep": True})


def memory_candidates(split_path: str, g: int, cap: int, run_seed: int,
                      validation_fraction: float) -> dict[str, np.ndarray]:
    """The row ids (sorted), labels and blocks of at most ``cap`` rows of every class of blocks
    0 … g−1 (validation slices left out), an exact seeded sample of each
    (:func:`incr_ray.method.hashing.per_class_sample`, the run's seed).

    Streamed on the driver from the split's ``row_id``, ``label`` and ``block`` columns, keeping
    ``cap`` rows per class at a time: bounded memory whatever the blocks' size. The run's seed, not
    the generation's: a row stays a candidate from one generation to the next unless a row of a
    later block hashes lower.
    """
    kept = {"row_id": np.empty(0, np.int64), "label": np.empty(0, np.int64), "block": np.empty(0, np.int64)}
    for batch in parquet_batches(split_path, ["row_id", "label", "block"], BATCH):
        ids, labels, blocks = (batch.column(c).to_numpy().astype(np.int64) for c in ("row_id", "label", "block"))
        mine = (blocks >= 0) & (blocks < g)
        if validation_fraction > 0:
            mine &= ~validation_mask(ids, run_seed, validation_fraction)
        both = {"row_id": np.concatenate([kept["row_id"], ids[mine]]),
                "label": np.concatenate([kept["label"], labels[mine]]),
                "block": np.concatenate([kept["block"], blocks[mine]])}
        # Identical rows share an id (incr_ray.method.hashing.row_ids): one place in the memory.
        _, first = np.unique(both["row_id"], return_index=True)
        both = {k: v[first] for k, v in both.items()}
        keep = per_class_sample(both["row_id"], both["label"], run_seed, cap, MEMORY_PURPOSE)
        kept = {k: v[keep] for k, v in both.items()}
    order = np.argsort(kept["row_id"], kind="stable")
    return {k: v[order] for k, v in kept.items()}


def _with_ids(batch: pa.Table, ids: np.ndarray) -> pa.Table:
    return batch.filter(pa.array(np.isin(batch.column("row_id").to_numpy(), ids)))


def rows_with_ids(ds: "ray.data.Dataset", ids: np.ndarray) -> "ray.data.Dataset":
    """The rows of ``ds`` whose ``row_id`` is one of ``ids`` (every copy of a repeated row)."""
    return ds.map_batches(_with_ids, batch_format="pyarrow", fn_kwargs={"ids": np.asarray(ids, np.int64)})
