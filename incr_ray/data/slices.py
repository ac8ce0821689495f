"""Row slices of a run besides the blocks: the validation slice carved from every block (never the
holdout), the retention sample of earlier blocks and an extension's own holdout. Both are per-row-id hashes of the run's seed,
so they come out the same whatever blocks Ray Data delivers the rows in."""

from __future__ import annotations

import ray.data
from ray.data.expressions import col

from ..method.hashing import extension_holdout_mask, retention_mask, validation_mask


def rows_where(batch, mask_fn, seed: int, fraction: float, keep: bool):
    """The rows of a numpy batch whose ``mask_fn(row ids, seed, fraction)`` equals ``keep``."""
    mask = mask_fn(batch["row_id"], seed, fraction)
    return {k: v[mask == keep] for k, v in batch.items()}


def validation_part(ds: "ray.data.Dataset", seed: int, fraction: float) -> "ray.data.Dataset":
    """The validation slice of ``ds`` (rows with ``row_id``)."""
    return ds.map_batches(rows_where, batch_format="numpy",
                          fn_kwargs={"mask_fn": validation_mask, "seed": seed, "fraction": fraction, "keep": True})


def training_part(ds: "ray.data.Dataset", seed: int, fraction: float) -> "ray.data.Dataset":
    """``ds`` without its validation slice (``ds`` itself when there is none)."""
    if fraction <= 0:
        return ds
    return ds.map_batches(rows_where, batch_format="numpy",
                          fn_kwargs={"mask_fn": validation_mask, "seed": seed, "fraction": fraction, "keep": False})


def retention_sample(split: "ray.data.Dataset", g: int, rows: int, block_sizes: list[int], seed: int,
                     validation_fraction: float) -> "ray.data.Dataset | None":
    """About ``rows`` trained rows of blocks 0 … g−1 (validation slices excluded); None when off."""
    earlier = sum(block_sizes[:g]) * (1 - validation_fraction)
    if rows <= 0 or g < 1 or earlier < 1:
        return None
    pool = training_part(split.filter(expr=(col("block") >= 0) & (col("block") < g)), seed, validation_fraction)
    return pool.map_batches(rows_where, batch_format="numpy",
                            fn_kwargs={"mask_fn": retention_mask, "seed": seed, "fraction": min(1.0, rows / earlier),
                                       "keep": True})


def extension_holdout_parts(ds: "ray.data.Dataset", seed: int, fraction: float):
    """(rows to train on, the extension's own holdout) of a new data file."""
    kwargs = {"mask_fn": extension_holdout_mask, "seed": seed, "fraction": fraction}
    return (ds.map_batches(rows_where, batch_format="numpy", fn_kwargs={**kwargs, "keep": False}),
            ds.map_batches(rows_where, batch_format="numpy", fn_kwargs={**kwargs, "keep": True}))
