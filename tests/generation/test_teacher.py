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


def _targets_table(n=10, replay_every=3):
    """A targets batch as score_block writes it: the rule applied to made-up teacher outputs."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=n)
    labels = np.arange(n, dtype=np.int64) % 3
    return {
        "row_id": np.arange(n, dtype=np.int64),
        "text": np.array([f"row {i}" for i in range(n)], dtype=object),
        "label": labels,
        "teacher_probs": probs,
        "target": soft_targets(probs, labels, threshold=0.8, floor=0.1),
        "replay": np.arange(n) % replay_every == 0,
    }


def test_block_rule_stats_leave_replay_rows_out():
    from incr_ray.generation.teacher import block_rule_stats
    from incr_ray.method.targets import target_rule_stats

    t = _targets_table()
    own = ~t["replay"]
    row = block_rule_stats({**t, "teacher_probs": np.array(list(t["teacher_probs"]), dtype=object)}, 0.8, 0.1)
    expected = target_rule_stats(t["teacher_probs"][own], t["label"][own], t["target"][own], 0.8, 0.1)
    assert {k: v[0] for k, v in row.items()} == pytest.approx(expected)
    assert row["rows"][0] == own.sum() == 6
    only_replay = block_rule_stats({**t, "replay": np.ones(10, dtype=bool)}, 0.8, 0.1)
    assert only_replay["rows"][0] == 0


def test_teacher_block_stats_over_ray_data_match_the_whole_block(ray_local, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray.data

    from incr_ray.generation.teacher import STATS_BATCH_SIZE, _with_list_columns, teacher_block_stats
    from incr_ray.method.targets import finalize_rule_stats, target_rule_stats

    t = _targets_table(n=2 * STATS_BATCH_SIZE + 37)  # several batches
    matrices = {k: t.pop(k) for k in ("teacher_probs", "target")}
    table = _with_list_columns(t, **matrices)
    assert table.schema.field("target").type == pa.list_(pa.float64())
    pq.write_table(table, tmp_path / "targets.parquet")
    stats = teacher_block_stats(ray.data.read_parquet(str(tmp_path / "targets.parquet")),
                                scoring_config(threshold=0.8, floor=0.1))
    own = ~t["replay"]
    expected = finalize_rule_stats(target_rule_stats(
        matrices["teacher_probs"][own], t["label"][own], matrices["target"][own], 0.8, 0.1))
    assert stats == pytest.approx(expected)
    assert stats["rows"] == own.sum()
