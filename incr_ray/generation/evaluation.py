"""Holdout evaluation: accuracy, macro-F1, NLL and ECE from additive per-batch statistics.

Two ways in, one computation (:mod:`incr_ray.method.metrics`): :func:`holdout_metrics` runs a
model already in memory over batches (the training workers, right after training), and
:func:`evaluate_model` loads a saved model into a Ray Data actor pool (``incr-ray evaluate``, and a
generation whose workers stopped before evaluating).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from ..config import Config
from ..method.metrics import STAT_KEYS, batch_stats, finalize, merge_stats
from ..method.targets import softmax
from ..modeling import classifier_logits, load_for_inference
from .teacher import pool_resources


def _stats(model, tokenizer, batch: dict[str, np.ndarray], cfg: Config, device=None) -> dict[str, np.ndarray]:
    logits = classifier_logits(model, tokenizer, [str(t) for t in batch["text"]], cfg.model.max_length, device)
    return batch_stats(softmax(logits), np.asarray(batch["label"], dtype=np.int64), num_bins=cfg.eval.ece_bins)


def holdout_metrics(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None) -> dict[str, float]:
    """Metrics of an in-memory model over numpy batches with ``text`` and ``label``."""
    model.eval()
    return finalize(merge_stats([_stats(model, tokenizer, b, cfg, device) for b in batches]))


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
    on_gpu = on_gpu and cfg.teacher.gpus_per_actor > 0
    stats_ds = ds.map_batches(
        HoldoutStatsScorer,
        fn_constructor_kwargs={"model_path": model_path, "cfg": cfg, "on_gpu": on_gpu},
        batch_size=cfg.eval.batch_size,
        **pool_resources(cfg, on_gpu),
    )
    rows = stats_ds.take_all()  # one small row per batch, not per example
    return finalize(merge_stats([{k: np.asarray(r[k]) for k in STAT_KEYS} for r in rows]))
