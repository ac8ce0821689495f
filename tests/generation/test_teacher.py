"""The teacher's scoring class on its own (no Ray): the target rule on the teacher's softmax."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.config import config_from_dict
from incr_ray.generation.teacher import TargetScorer
from incr_ray.method.targets import soft_targets


def scoring_config(**method):
    return config_from_dict({"model": {"max_length": 16}, "method": method})


def batch(n=10):
    return {
        "row_id": np.arange(n, dtype=np.int64),
        "text": np.array([f"word {i} apple car" for i in range(n)], dtype=object),
        "label": np.arange(n, dtype=np.int64) % 3,
        "block": np.ones(n, dtype=np.int64),
    }


@pytest.mark.parametrize("device_map_auto", [False, True])
def test_targets_apply_the_rule_to_the_teachers_softmax(tiny_bert, device_map_auto):
    cfg = scoring_config(threshold=0.8, floor=0.1)
    cfg.teacher.device_map_auto = device_map_auto
    scorer = TargetScorer(tiny_bert, cfg, on_gpu=False)
    out = scorer(batch()).to_pydict()
    probs = np.array(out["teacher_probs"])
    assert probs.shape == (10, 3) and np.allclose(probs.sum(1), 1)
    expected = soft_targets(probs, np.arange(10) % 3, threshold=0.8, floor=0.1)
    np.testing.assert_allclose(np.array(out["target"]), expected)
    assert out["row_id"] == list(range(10))


def test_temperature_flattens_the_teacher(tiny_bert):
    sharp = np.array(TargetScorer(tiny_bert, scoring_config(temperature=1.0), False)(batch()).to_pydict()["teacher_probs"])
    soft = np.array(TargetScorer(tiny_bert, scoring_config(temperature=4.0), False)(batch()).to_pydict()["teacher_probs"])
    assert (soft.max(1) <= sharp.max(1) + 1e-12).all()


def test_an_actor_given_no_gpu_stays_on_the_cpu(tiny_bert, monkeypatch):
    """Ray 2.60 shows every GPU to an actor that asked for none: the device comes from what the
    pool asked for, never from what torch can see."""
    import torch

    from incr_ray.generation.teacher import scoring_pool

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    scorer = TargetScorer(tiny_bert, scoring_config(), on_gpu=False)
    assert next(scorer.model.parameters()).device.type == "cpu"
    cfg = scoring_config()
    cfg.teacher.gpus_per_actor = 0
    resources, actor_gpu = scoring_pool(cfg, on_gpu=True)
    assert not actor_gpu and "num_gpus" not in resources
    cfg.teacher.gpus_per_actor = 1
    resources, actor_gpu = scoring_pool(cfg, on_gpu=True)
    assert actor_gpu and resources["num_gpus"] == 1


def test_non_finite_teacher_logits_name_the_fix(tiny_bert):
    import torch

    from incr_ray.modeling import NonFiniteError

    scorer = TargetScorer(tiny_bert, scoring_config(), on_gpu=False)
    with torch.no_grad():
        scorer.model.classifier.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="fp32"):
        scorer(batch())
