"""Holdout evaluation: accuracy, macro-F1, NLL and ECE from additive per-batch statistics.

Two ways in, one computation (:mod:`incr_ray.method.metrics`): :func:`holdout_metrics` runs a
model already in memory over batches (the training workers, right after training), and
:func:`evaluate_model` loads a saved model into a Ray Data actor pool (``incr-ray evaluate``, and a
generation whose workers stopped before evaluating).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from ..config import Config
from ..method.metrics import STAT_KEYS, batch_stats, finalize, merge_stats
from ..method.targets import softmax
from ..modeling import classifier_logits, load_for_inference
from .teacher import scoring_pool


def _stats(model, tokenizer, batch: dict[str, np.ndarray], cfg: Config, device=None, keep: int | None = None):
    """Statistics of the first ``keep`` rows of ``batch`` (all by default); every row is scored."""
    logits = classifier_logits(model, tokenizer, [str(t) for t in batch["text"]], cfg.model.max_length, device)
    labels = np.asarray(batch["label"], dtype=np.int64)
    return batch_stats(softmax(logits)[:keep], labels[:keep], num_bins=cfg.eval.ece_bins)


def rank_slice(n: int, rank: int, world: int) -> tuple[np.ndarray, int]:
    """Rows of an ``n``-row batch that ``rank`` scores — every ``world``-th, padded with row 0 to
    ``ceil(n / world)`` so all ranks run the same forwards — and how many of them are real."""
    mine = np.arange(rank, n, world)
    padded = np.concatenate([mine, np.zeros(-(-n // world) - len(mine), dtype=np.int64)])
    return padded, len(mine)


def sum_over_ranks(stats: dict[str, np.ndarray], device) -> dict[str, np.ndarray]:
    """All-reduce (sum) of :func:`batch_stats` statistics over the torch.distributed group."""
    flat = np.concatenate([np.asarray(stats[k], dtype=np.float64).ravel() for k in STAT_KEYS])
    total = torch.from_numpy(flat).to(device)
    dist.all_reduce(total)  # float64 keeps the integer counts exact up to 2**53
    out, at, summed = {}, 0, total.cpu().numpy()
    for k in STAT_KEYS:
        value = np.asarray(stats[k])
        out[k] = summed[at:at + value.size].reshape(value.shape).astype(value.dtype)
        at += value.size
    return out


def holdout_metrics(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                    rank: int = 0, world: int = 1) -> dict[str, float]:
    """Metrics of an in-memory model over numpy batches with ``text`` and ``label``.

    With ``world > 1`` (a torch.distributed group whose ranks all see the same batches) each rank
    scores its :func:`rank_slice` of every batch and the statistics are summed over the group: the
    holdout is evaluated once, not once per rank, and under ZeRO-3 every rank still runs the same
    number of forwards, as the parameter gathers require.
    """
    model.eval()
    stats = []
    for batch in batches:
        rows, real = rank_slice(len(batch["label"]), rank, world)
        stats.append(_stats(model, tokenizer, {k: np.asarray(batch[k])[rows] for k in ("text", "label")},
                            cfg, device, keep=real))
    merged = merge_stats(stats)
    return finalize(sum_over_ranks(merged, device) if world > 1 else merged)


class HoldoutStatsScorer:
    """``map_batches`` class: one row of additive statistics per batch."""

    def __init__(self, model_path: str, cfg: Config, on_gpu: bool):
        self.model, self.tokenizer = load_for_inference(model_path, cfg, on_gpu)
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        stats = _stats(self.model, self.tokenizer, batch, self.cfg)
        return {k: np.asarray(stats[k])[None, ...] for k in STAT_KEYS}


def evaluate_model(ds, model_path: str, cfg: Config, on_gpu: bool) -> dict[str, float]:
    """Holdout metrics of the saved model at ``model_path`` on ``ds``."""
    ds = ds.materialize()  # see score_block
    resources, actor_gpu = scoring_pool(cfg, on_gpu)
    stats_ds = ds.map_batches(
        HoldoutStatsScorer,
        fn_constructor_kwargs={"model_path": model_path, "cfg": cfg, "on_gpu": actor_gpu},
        batch_size=cfg.eval.batch_size,
        **resources,
    )
    rows = stats_ds.take_all()  # one small row per batch, not per example
    return finalize(merge_stats([{k: np.asarray(r[k]) for k in STAT_KEYS} for r in rows]))
