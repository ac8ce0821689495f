"""The scoring class on its own (no Ray): targets, stats, device_map path."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.metrics import STAT_KEYS, evaluate_probs, finalize, merge_stats
from incr_ray.targets import soft_targets
from incr_ray.teacher import ClassifierScorer


def _batch(n=10):
    return {
        "row_id": np.arange(n, dtype=np.int64),
        "text": np.array([f"word {i} apple car" for i in range(n)], dtype=object),
        "label": np.arange(n, dtype=np.int64) % 3,
        "block": np.ones(n, dtype=np.int64),
    }


@pytest.mark.parametrize("device_map_auto", [False, True])
def test_targets_mode_applies_the_rule_to_the_teachers_softmax(tiny_bert, device_map_auto):
    scorer = ClassifierScorer(tiny_bert, mode="targets", threshold=0.8, floor=0.1,
                              device_map_auto=device_map_auto, max_length=16)
    out = scorer(_batch()).to_pydict()
    probs = np.array(out["teacher_probs"])
    assert probs.shape == (10, 3) and np.allclose(probs.sum(1), 1)
    expected = soft_targets(probs, np.arange(10) % 3, threshold=0.8, floor=0.1)
    np.testing.assert_allclose(np.array(out["target"]), expected)
    assert out["row_id"] == list(range(10))


def test_temperature_flattens_the_teacher(tiny_bert):
    sharp = np.array(ClassifierScorer(tiny_bert, temperature=1.0)(_batch()).to_pydict()["teacher_probs"])
    soft = np.array(ClassifierScorer(tiny_bert, temperature=4.0)(_batch()).to_pydict()["teacher_probs"])
    assert (soft.max(1) <= sharp.max(1) + 1e-12).all()


def test_stats_mode_is_additive(tiny_bert):
    scorer = ClassifierScorer(tiny_bert, mode="stats", max_length=16)
    a, b = _batch(6), _batch(10)
    stats = [{k: v[0] for k, v in scorer(x).items()} for x in (a, b)]
    merged = finalize(merge_stats(stats))
    probs = np.concatenate([
        np.array(ClassifierScorer(tiny_bert, mode="targets")(x).to_pydict()["teacher_probs"]) for x in (a, b)
    ])
    labels = np.concatenate([a["label"], b["label"]])
    whole = evaluate_probs(probs, labels)
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert merged[k] == pytest.approx(whole[k], abs=1e-9)
    assert set(STAT_KEYS) <= set(scorer(a))
