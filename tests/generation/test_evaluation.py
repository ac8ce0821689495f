"""Holdout evaluation without Ray: the actor-pool scorer's statistics are additive."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.generation.evaluation import HoldoutStatsScorer, holdout_metrics
from incr_ray.generation.teacher import TargetScorer
from incr_ray.method.metrics import STAT_KEYS, batch_stats, finalize, merge_stats
from incr_ray.modeling import load_for_inference
from test_teacher import batch, scoring_config


def test_stats_are_additive(tiny_bert):
    cfg = scoring_config()
    scorer = HoldoutStatsScorer(tiny_bert, cfg, on_gpu=False)
    a, b = batch(6), batch(10)
    stats = [{k: v[0] for k, v in scorer(x).items()} for x in (a, b)]
    merged = finalize(merge_stats(stats))
    probs = np.concatenate([
        np.array(TargetScorer(tiny_bert, cfg, False)(x).to_pydict()["teacher_probs"]) for x in (a, b)
    ])
    labels = np.concatenate([a["label"], b["label"]])
    whole = finalize(batch_stats(probs, labels))
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert merged[k] == pytest.approx(whole[k], abs=1e-9)
    assert set(STAT_KEYS) <= set(scorer(a))
    # The in-worker path (a model already in memory) gives the same figures.
    model, tokenizer = load_for_inference(tiny_bert, cfg, on_gpu=False)
    in_memory = holdout_metrics(model, tokenizer, [a, b], cfg)
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert in_memory[k] == pytest.approx(whole[k], abs=1e-9)
