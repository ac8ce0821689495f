"""Suspects on the driver, below Ray: found in a generation's stored targets, written beside them,
listed by `incr-ray suspects`, and the training rows under each `method.suspects`."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from incr_ray.config import config_from_dict
from incr_ray.method.targets import soft_targets
from incr_ray.run.suspects import find_suspects, suspects_record, training_rows, write_suspects

LABELS = ["neg", "pos"]
PROBS = np.array([[0.95, 0.05], [0.02, 0.98], [0.5, 0.5], [0.09, 0.91], [0.01, 0.99], [0.6, 0.4]])
LABEL = np.array([1, 0, 0, 0, 1, 1])
REPLAY = np.array([False, False, False, False, True, False])  # row 4 is a suspect from an earlier block


def _list_column(m: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1)), m.shape[1]).cast(pa.list_(pa.float64()))


def targets_table() -> pa.Table:
    return pa.table({"row_id": pa.array(np.arange(6) + 10), "text": [f"text {i}" for i in range(6)],
                     "label": pa.array(LABEL), "teacher_probs": _list_column(PROBS),
                     "target": _list_column(soft_targets(PROBS, LABEL, threshold=0.9)), "replay": REPLAY})


@pytest.fixture
def targets(tmp_path):
    folder = tmp_path / "gen_001" / "targets"
    folder.mkdir(parents=True)
    pq.write_table(targets_table(), folder / "part-0.parquet")
    return str(folder)


def cfg(**method):
    return config_from_dict({"method": {"suspect_below": 0.1, **method}})


def test_the_block_rows_the_teacher_contradicts_surest_first(targets):
    table, seen = find_suspects(targets, cfg(), LABELS)
    assert seen == 5  # the replay row is an earlier block's
    got = table.to_pylist()
    assert [r["row_id"] for r in got] == [11, 10, 13]  # p(label) 0.02, 0.05, 0.09
    assert got[0] == {"row_id": 11, "text": "text 1", "label": "neg", "teacher_class": "pos",
                      "teacher_prob": pytest.approx(0.98), "label_prob": pytest.approx(0.02)}
    record = suspects_record(table, seen, cfg(), "gen_001/suspects.parquet")
    assert record == {"path": "gen_001/suspects.parquet", "rows": 3, "block_rows": 5, "share": 0.6, "below": 0.1,
                      "policy": "keep"}
    none, _ = find_suspects(targets, cfg(suspect_below=0.01), LABELS)
    assert none.num_rows == 0 and none.schema.names == table.schema.names


@pytest.mark.parametrize("policy, rows, one_hot", [("keep", [10, 11, 12, 13, 14, 15], []),
                                                   ("one_hot", [10, 11, 12, 13, 14, 15], [10, 11, 13]),
                                                   ("drop", [12, 14, 15], [])])
def test_the_training_rows_under_each_lever(policy, rows, one_hot):
    table = targets_table()
    out = training_rows(cfg(suspects=policy))(table)
    assert out.schema.names == ["row_id", "text", "label", "target"]
    assert out.column("row_id").to_pylist() == rows
    before = dict(zip(table.column("row_id").to_pylist(), table.column("target").to_pylist()))
    for row_id, label, target in zip(*(out.column(c).to_pylist() for c in ("row_id", "label", "target"))):
        want = np.eye(2)[label].tolist() if row_id in one_hot else before[row_id]
        assert target == pytest.approx(want), row_id
    assert training_rows(cfg(suspects=policy))(table.slice(0, 0)).num_rows == 0


def _run_folder(tmp_path, targets_dir: str, suspects: bool = True):
    """A run folder with what `incr-ray suspects` reads: run.json and gen_001/suspects.parquet."""
    from incr_ray.run.manifest import GenerationEntry

    table, seen = find_suspects(targets_dir, cfg(), LABELS)
    write_suspects(str(tmp_path / "gen_001" / "suspects.parquet"), table)
    entries = [GenerationEntry(index=0, status="finished"),
               GenerationEntry(index=1, status="finished",
                               suspects=suspects_record(table, seen, cfg(), "gen_001/suspects.parquet") if suspects else None)]
    return entries


def test_the_suspects_command_lists_them_from_the_folder_alone(tmp_path, targets, capsys, monkeypatch):
    from incr_ray import cli
    from incr_ray.run import suspects as module
    from incr_ray.run.manifest import RunError

    entries = _run_folder(tmp_path, targets)
    (tmp_path / "run.json").write_text("{}")

    class Manifest:  # run.json's generations, as manifest.load gives them
        generations = entries

    monkeypatch.setattr("incr_ray.run.manifest.load", lambda path: Manifest)
    g, table, record = module.run_suspects(str(tmp_path))
    assert (g, table.num_rows, record["rows"]) == (1, 3, 3)
    with pytest.raises(RunError, match=r"generation 0 of .* has no suspects \(generations with suspects: 1\); "
                                       "generation 0 has no teacher"):
        module.run_suspects(str(tmp_path), 0)

    out_csv = tmp_path / "out" / "top.csv"
    assert cli.main(["suspects", "--run", str(tmp_path), "--top", "2", "--csv", str(out_csv)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("generation 1: 3 of 5 block rows (60.0%) get under 0.1 of the teacher for their label; "
                        f"the student was set to keep them (method.suspects); 2 written to {out_csv}")
    assert lines[2].split()[:5] == ["11", "neg", "pos", "0.980", "0.020"] and len(lines) == 4
    assert out_csv.read_text().splitlines()[0] == "row_id,text,label,teacher_class,teacher_prob,label_prob"

    assert cli.main(["suspects", "--run", str(tmp_path / "nowhere")]) == 2
    assert "is not an incr-ray run folder" in capsys.readouterr().err
