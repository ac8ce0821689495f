"""Replay: a seeded sample of earlier blocks' rows joins generation g's block,
re-scored by the same teacher — a small memory against forgetting when blocks drift."""

from __future__ import annotations

import ray.data
from ray.data.expressions import col

from ..method.hashing import generation_seed, sample_mask
from .slices import rows_where


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
