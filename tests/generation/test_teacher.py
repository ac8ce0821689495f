"""The teacher's scoring class on its own (no Ray): the target rule on the teacher's softmax."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.config import config_from_dict
from incr_ray.generation.teacher import TargetScorer
from incr_ray.method.targets import padded_probs, soft_targets, softmax


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


def test_a_teacher_of_fewer_classes_is_padded_before_the_rule(tiny_bert):
    """extend --allow-new-labels: the 3-class teacher scores rows of 5 classes (3 and 4 are new)."""
    rows = batch()
    rows["label"] = np.arange(10, dtype=np.int64) % 5
    out = TargetScorer(tiny_bert, scoring_config(threshold=0.8), on_gpu=False, num_classes=5)(rows).to_pydict()
    own = np.array(TargetScorer(tiny_bert, scoring_config(threshold=0.8), on_gpu=False)(batch()).to_pydict()["teacher_probs"])
    probs, target = np.array(out["teacher_probs"]), np.array(out["target"])
    assert probs.shape == target.shape == (10, 5) and (probs[:, 3:] == 0).all()
    np.testing.assert_allclose(probs[:, :3], own)
    new = rows["label"] >= 3
    np.testing.assert_allclose(target[new, :3], own[new] * 0.2)
    np.testing.assert_allclose(target[new, rows["label"][new]], 0.8)
    np.testing.assert_allclose(target, soft_targets(probs, rows["label"], threshold=0.8))


@pytest.fixture(scope="module")
def two_class_bert(tmp_path_factory):
    """A tiny BERT that knows c0 and c1 only: a generation from before an extension added c2."""
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("two_class_bert"), num_labels=2)


def test_an_ensemble_teaches_with_the_mean_of_its_members_softmaxes(tiny_bert, two_class_bert):
    """teacher.ensemble: one actor holds every member; an older member of 2 classes (before an
    extension added c2) is padded with a zero for c2 before the mean, and the rule applies to the
    mean. Each member's softmax is taken at τ."""
    from incr_ray.modeling import classifier_logits

    older = two_class_bert
    scorer = TargetScorer([older, tiny_bert], scoring_config(threshold=0.8, temperature=2.0), on_gpu=False,
                          num_classes=3)
    out = scorer(batch()).to_pydict()
    alone = [padded_probs(softmax(classifier_logits(model, tokenizer, out["text"], 16), 2.0), 3)
             for model, tokenizer in scorer.members]
    assert alone[0].shape == alone[1].shape == (10, 3) and (alone[0][:, 2] == 0).all()
    assert not np.allclose(alone[0], alone[1])
    probs = np.array(out["teacher_probs"])
    np.testing.assert_allclose(probs, (alone[0] + alone[1]) / 2, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.array(out["target"]), soft_targets(probs, np.arange(10) % 3, threshold=0.8))


def test_the_replay_candidates_get_the_teachers_normalised_features(tiny_bert):
    """replay.selection herding: ``teacher_features`` on the replay rows (L2-normalised, from the
    same forward), null on the block's own rows; the probabilities and targets are unchanged."""
    from incr_ray.heads import output_layer_name
    from incr_ray.modeling import classifier_logits

    rows = {**batch(), "replay": np.arange(10) % 3 == 0}
    cfg = scoring_config(threshold=0.8)
    scorer = TargetScorer(tiny_bert, cfg, on_gpu=False, features=True)
    out = scorer(rows)
    plain = TargetScorer(tiny_bert, cfg, on_gpu=False)(rows)
    assert out.drop_columns(["teacher_features"]).equals(plain)
    features = out.column("teacher_features").to_pylist()
    assert [f is None for f in features] == (~rows["replay"]).tolist()
    _, raw = classifier_logits(scorer.model, scorer.tokenizer, list(rows["text"]), 16,
                               feature_layer=output_layer_name(scorer.model))
    expected = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    np.testing.assert_allclose(np.array([features[i] for i in (0, 3, 6, 9)]), expected[[0, 3, 6, 9]], atol=1e-6)


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

    from incr_ray.generation.teacher import _with_list_columns

    t = _targets_table()
    own = ~t["replay"]

    def batch(**columns):
        plain = {k: v for k, v in {**t, **columns}.items() if k not in ("teacher_probs", "target")}
        return _with_list_columns(plain, teacher_probs=t["teacher_probs"], target=t["target"]).to_batches()[0]

    row = block_rule_stats(batch(), 0.8, 0.1)
    expected = target_rule_stats(t["teacher_probs"][own], t["label"][own], t["target"][own], 0.8, 0.1)
    assert row == pytest.approx(expected)
    assert row["rows"] == own.sum() == 6
    assert block_rule_stats(batch(replay=np.ones(10, dtype=bool)), 0.8, 0.1)["rows"] == 0


@pytest.mark.parametrize("replay_column", [True, False])
def test_teacher_block_stats_streamed_from_parquet_match_the_whole_block(tmp_path, replay_column):
    """Several batches and several files, as the scoring pool writes them; a run folder from
    before replay has no ``replay`` column (every row is the block's own)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from incr_ray.generation.teacher import STATS_BATCH_SIZE, _with_list_columns, teacher_block_stats
    from incr_ray.method.targets import finalize_rule_stats, target_rule_stats

    t = _targets_table(n=2 * STATS_BATCH_SIZE + 37)
    if not replay_column:
        t.pop("replay")
    matrices = {k: t.pop(k) for k in ("teacher_probs", "target")}
    table = _with_list_columns(t, **matrices)
    assert table.schema.field("target").type == pa.list_(pa.float64())
    folder = tmp_path / "targets"
    folder.mkdir()
    pq.write_table(table.slice(0, 5000), folder / "a.parquet", row_group_size=1000)
    pq.write_table(table.slice(5000), folder / "b.parquet")
    stats = teacher_block_stats(str(folder), scoring_config(threshold=0.8, floor=0.1))
    own = ~t["replay"] if replay_column else np.ones(len(t["label"]), dtype=bool)
    expected = finalize_rule_stats(target_rule_stats(
        matrices["teacher_probs"][own], t["label"][own], matrices["target"][own], 0.8, 0.1))
    assert stats == pytest.approx(expected)
    assert stats["rows"] == own.sum()
    pq.write_table(table.slice(0, 0), folder / "a.parquet")
    pq.write_table(table.slice(0, 0), folder / "b.parquet")
    assert teacher_block_stats(str(folder), scoring_config()) is None  # no rows, no figures


def test_tokenized_rows_score_as_the_texts_do(tiny_bert):
    """The CPU stage's token ids (GPU pools) give the scorer the targets it makes from the texts,
    and the ids column does not reach the stored targets."""
    import pyarrow as pa

    from incr_ray.generation.teacher import TOKEN_IDS, tokenize_batch

    cfg = scoring_config(threshold=0.8)
    scorer = TargetScorer(tiny_bert, cfg, on_gpu=False)
    b = batch()
    tokenized = tokenize_batch(pa.table(b), tiny_bert, max_length=16)
    assert tokenized.schema.field(TOKEN_IDS).type == pa.list_(pa.int32())
    as_numpy = {c: tokenized.column(c).to_numpy(zero_copy_only=False) for c in tokenized.column_names}
    from_ids, from_texts = scorer(as_numpy).to_pydict(), scorer(b).to_pydict()
    assert TOKEN_IDS not in from_ids
    np.testing.assert_allclose(from_ids["teacher_probs"], from_texts["teacher_probs"], atol=1e-6)
    assert from_ids["row_id"] == from_texts["row_id"] == list(range(10))


@pytest.mark.parametrize("rows, blocks, batch_size, pool, expected", [
    (700, 1, 512, 1, None),  # one actor, a few batches: the block serves as it is
    (100_000, 1, 512, 1, 512 * 28),  # 196 batches: cut so that no block holds over 32
    (100_000, 200, 512, 1, None),
    (5000, 1, 512, 2, 512),  # 10 batches over 2 actors: 10 blocks of one batch (at least 8)
    (5000, 3, 512, 2, 512),
    (5000, 8, 512, 2, None),
    (40_000, 4, 512, 8, 512 * 2),  # 79 batches, 8 actors: 40 blocks of 2 batches
    (10, 1, 512, 4, None),  # fewer rows than a batch: one block
])
def test_scoring_blocks_give_each_actor_several_blocks_of_whole_batches(rows, blocks, batch_size, pool, expected):
    from incr_ray.generation.teacher import BLOCKS_PER_ACTOR, MAX_BATCHES_PER_BLOCK, scoring_block_rows

    per_block = scoring_block_rows(rows, blocks, batch_size, pool)
    assert per_block == expected
    if per_block is not None:
        assert per_block % batch_size == 0 and per_block <= batch_size * MAX_BATCHES_PER_BLOCK
        if pool > 1:
            assert -(-rows // per_block) >= min(BLOCKS_PER_ACTOR * pool, -(-rows // batch_size))
