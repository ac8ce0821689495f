"""The representative memory of a generation, without Ray: herding over a scored Parquet, the
rows it keeps, gen_<g>/memory.parquet and its record."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from incr_ray.config import config_from_dict
from incr_ray.method.herding import class_memory, l2_normalised
from incr_ray.run.memory import (herd, keep_memory, memory_line, memory_record, memory_table, uniform_ranks)

LABELS = ["calm", "storm", "drizzle"]


def _features_column(features: np.ndarray, replay: np.ndarray) -> pa.Array:
    return pa.array([f.tolist() if r else None for f, r in zip(features, replay)], pa.list_(pa.float32()))


def _scored(tmp_path, n=60, dim=5, seed=0):
    """A scored generation as the teacher writes it with features: block rows (no features) then
    replay candidates (features), in two files, the candidates' rows in no particular order."""
    rng = np.random.default_rng(seed)
    replay = np.arange(n) % 2 == 0
    row_id = rng.permutation(10 * n)[:n].astype(np.int64)
    label = rng.integers(0, 3, size=n)
    features = l2_normalised(rng.normal(size=(n, dim))).astype(np.float32)
    table = pa.table({"row_id": row_id, "text": [f"t{i}" for i in range(n)], "label": label,
                      "block": np.where(replay, 0, 1), "replay": replay,
                      "target": pa.array([[1.0, 0.0, 0.0]] * n, pa.list_(pa.float64())),
                      "teacher_features": _features_column(features, replay)})
    folder = tmp_path / "scored"
    folder.mkdir()
    pq.write_table(table.slice(0, n // 2), folder / "a.parquet")
    pq.write_table(table.slice(n // 2), folder / "b.parquet")
    return str(folder), table, features


def test_herding_picks_per_class_from_the_candidates_in_row_id_order(tmp_path):
    path, table, features = _scored(tmp_path)
    picks, candidates = herd(path, 4)
    replay = table.column("replay").to_numpy()
    ids, labels = table.column("row_id").to_numpy()[replay], table.column("label").to_numpy()[replay]
    assert candidates == replay.sum()
    order = np.argsort(ids)
    index, rank, distance = class_memory(features[replay][order].astype(np.float64), labels[order], 4)
    np.testing.assert_array_equal(picks["row_id"], ids[order][index])
    np.testing.assert_array_equal(picks["rank"], rank)
    np.testing.assert_allclose(picks["distance"], distance)
    assert (picks["block"] == 0).all()
    for c in range(3):
        assert (picks["label"] == c).sum() == min(4, (labels == c).sum())


def test_only_the_memory_stays_beside_the_block_rows(tmp_path):
    _, table, _ = _scored(tmp_path)
    replay = table.column("replay").to_numpy()
    memory = table.column("row_id").to_numpy()[replay][:3]
    kept = keep_memory(table, memory)
    assert "teacher_features" not in kept.column_names
    kept_replay = kept.column("replay").to_numpy()
    assert (~kept_replay).sum() == (~replay).sum()  # every block row
    assert sorted(kept.column("row_id").to_numpy()[kept_replay]) == sorted(memory)


def test_the_memory_file_and_its_record(tmp_path):
    path, _, _ = _scored(tmp_path)
    picks, candidates = herd(path, 4)
    table = memory_table(picks, LABELS, "herding")
    assert table.column_names == ["row_id", "label", "label_id", "block", "rank", "distance", "selection"]
    frame = table.to_pandas()
    assert list(frame.label_id) == sorted(frame.label_id)  # by class, then rank
    assert all(list(g["rank"]) == list(range(len(g))) for _, g in frame.groupby("label_id"))
    assert set(frame.selection) == {"herding"} and set(frame.label) <= set(LABELS)
    cfg = config_from_dict({"replay": {"per_class": 4, "selection": "herding"}})
    record = memory_record(table, cfg, "gen_001/memory.parquet", candidates)
    assert record["rows"] == len(frame) and record["classes"] == frame.label_id.nunique()
    assert record["per_label"] == frame.label.value_counts().to_dict() and record["candidates"] == candidates
    last = frame.groupby("label_id").tail(1)
    assert record["mean_distance"] == pytest.approx(last.distance.mean())
    line = memory_line(1, record)
    assert line.startswith(f"[gen 1] memory: {len(frame)} rows of {record['classes']} old classes (up to 4 a class")
    assert "by herding on the teacher's features" in line and line.endswith("gen_001/memory.parquet")


def test_a_uniform_memory_is_the_candidates_in_their_drawn_order():
    ids, labels = np.array([50, 10, 30, 20, 40], np.int64), np.array([1, 0, 1, 0, 1])
    ranks = uniform_ranks(ids, labels, 3)
    assert sorted(ranks[labels == 1].tolist()) == [0, 1, 2] and sorted(ranks[labels == 0].tolist()) == [0, 1]
    table = memory_table({"row_id": ids, "label": labels, "block": np.zeros(5, np.int64), "rank": ranks},
                         LABELS, "uniform")
    assert table.column("distance").null_count == 5 and set(table.column("selection").to_pylist()) == {"uniform"}
    record = memory_record(table, config_from_dict({"replay": {"per_class": 3}}), "m.parquet", 5)
    assert "mean_distance" not in record and record["per_label"] == {"calm": 2, "storm": 3}
    assert "fewer rows than that of 'calm'" in memory_line(2, record) and "at random (seeded)" in memory_line(2, record)
