"""Reading and splitting on Ray Data: sources, validation, label map, holdout, blocks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data.expressions import col

from incr_ray.config import config_from_dict
from incr_ray.data import (
    HOLDOUT,
    ROW_COLUMNS,
    SYNTHETIC_LABELS,
    DataError,
    read_labelled_file,
    open_source,
    split_data,
)

# ---------------------------------------------------------------------------------------------
# Ray Data: reading, splitting, validation


def _cfg(data: dict, k: int = 2, batch_size: int = 1, **sections):
    return config_from_dict({"data": data, "method": {"k": k}, "student": {"batch_size": batch_size}, **sections})


def _rows(ds) -> list[dict]:
    return sorted(ds.take_all(), key=lambda r: r["text"])


def _write_csv(path, header: str, rows: list[str]) -> str:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def _labelled_rows(n: int, labels) -> tuple[list[str], list]:
    return [f"review number {i} says {labels[i % len(labels)]}" for i in range(n)], [labels[i % len(labels)] for i in range(n)]


def test_read_csv_renamed_columns_with_int_labels_sorted_numerically(ray_local, tmp_path):
    texts, labels = _labelled_rows(60, [10, 2, 1])
    path = _write_csv(tmp_path / "reviews.csv", "review,stars,extra", [f'"{t}",{y},z' for t, y in zip(texts, labels)])
    data = {"source": path, "text_column": "review", "label_column": "stars", "eval_fraction": 0.2}

    raw = _rows(open_source(_cfg(data).data, seed=0)[0])
    assert set(raw[0]) == {"text", "label"} and raw[0]["text"].startswith("review number")
    assert {r["label"] for r in raw} == {1, 2, 10}  # ints stay ints in the raw source

    split = split_data(_cfg(data))
    assert split.label_names == ["1", "2", "10"]
    rows = split.dataset.take_all()
    assert all(split.label_names[r["label"]] == r["text"].rsplit(" ", 1)[1] for r in rows)


def test_read_jsonl_and_parquet_with_string_labels(ray_local, tmp_path):
    texts, labels = _labelled_rows(12, ["pos", "neg"])
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t, "tag": y}) + "\n" for t, y in zip(texts, labels)))
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"body": texts[:6], "tag": labels[:6], "n": list(range(6))}), folder / "a.parquet")
    pq.write_table(pa.table({"body": texts[6:], "tag": labels[6:], "n": list(range(6))}), folder / "b.parquet")
    (folder / "_SUCCESS").write_text("")

    for source in (str(jsonl), str(folder)):
        cfg = _cfg({"source": source, "text_column": "body", "label_column": "tag"})
        rows = _rows(open_source(cfg.data, seed=0)[0])
        assert [(r["text"], r["label"]) for r in rows] == sorted(zip(texts, labels)), source


def test_latin1_bytes_become_replacement_characters(ray_local, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"text,label\ncaf\xe9 au lait,a\nna\xefve,b\nplain,a\n")
    rows = _rows(open_source(_cfg({"source": str(path)}).data, seed=0)[0])
    assert [r["text"] for r in rows] == ["caf\ufffd au lait", "na\ufffdve", "plain"]


def test_split_data_blocks_disjoint_covering_and_deterministic(ray_local):
    cfg = _cfg({"source": "synthetic", "synthetic_rows": 1200, "synthetic_classes": 3}, k=3, batch_size=8)
    a = split_data(cfg)
    assert tuple(a.dataset.schema().names) == ROW_COLUMNS
    assert a.label_names == SYNTHETIC_LABELS[:3]
    rows = a.dataset.take_all()
    assert len(rows) == 1200 and sum(a.block_sizes) + a.holdout_size == 1200
    by_block = {b: {r["row_id"] for r in rows if r["block"] == b} for b in range(-1, 3)}
    assert [len(by_block[b]) for b in range(3)] == a.block_sizes  # no duplicate synthetic texts
    assert len(by_block[-1]) == a.holdout_size and 60 < a.holdout_size < 180
    assert max(a.block_sizes) - min(a.block_sizes) <= 2
    assert {r["label"] for r in rows} == {0, 1, 2}

    b = split_data(cfg)
    assert b.fingerprint == a.fingerprint and b.block_sizes == a.block_sizes
    assert sorted((r["row_id"], r["block"]) for r in b.dataset.take_all()) == sorted(
        (r["row_id"], r["block"]) for r in rows
    )
    other = split_data(_cfg({"source": "synthetic", "synthetic_rows": 1200}, k=3, batch_size=8, run={"seed": 1}))
    assert other.fingerprint != a.fingerprint


def test_max_rows_is_a_seeded_sample(ray_local):
    data = {"source": "synthetic", "synthetic_rows": 2000, "max_rows": 500}
    first = open_source(_cfg(data).data, seed=0)[0]
    n = first.count()
    assert 400 < n < 600
    assert sorted(r["text"] for r in first.take_all()) == sorted(r["text"] for r in open_source(_cfg(data).data, 0)[0].take_all())


def test_rotten_tomatoes_three_classes_and_binary(ray_local):
    full = split_data(_cfg({"source": "rotten_tomatoes"}, k=4, batch_size=32))
    assert full.label_names == ["rotten", "fresh", "plot"]
    assert sum(full.block_sizes) + full.holdout_size == 13_905 - 14  # the empty snippets are dropped
    assert max(full.block_sizes) - min(full.block_sizes) < 0.02 * min(full.block_sizes)

    binary = split_data(_cfg({"source": "rotten_tomatoes", "binary": True, "eval_fraction": 0.2}, k=2))
    assert binary.label_names == ["rotten", "fresh"]
    assert binary.dataset.filter(expr=col("label") > 1).count() == 0
    plot_rows = full.dataset.filter(expr=col("label") == 2).count()
    assert sum(binary.block_sizes) + binary.holdout_size == 13_905 - 14 - plot_rows


def test_eval_file_joins_as_holdout_and_unknown_labels_are_refused(ray_local, tmp_path):
    texts, labels = _labelled_rows(40, ["pos", "neg"])
    train = _write_csv(tmp_path / "train.csv", "text,label", [f"{t},{y}" for t, y in zip(texts, labels)])
    evl = _write_csv(tmp_path / "eval.csv", "text,label", ["fine film,pos", "dull film,neg", "ok film,pos"])
    split = split_data(_cfg({"source": train, "eval_path": evl, "eval_fraction": 0.5}))
    assert split.holdout_size == 3 and sum(split.block_sizes) == 40  # no holdout carved from train
    held = split.dataset.filter(expr=col("block") == HOLDOUT).take_all()
    assert sorted((r["text"], split.label_names[r["label"]]) for r in held) == [
        ("dull film", "neg"), ("fine film", "pos"), ("ok film", "pos"),
    ]

    ds = read_labelled_file(evl, _cfg({}).data, ["neg", "pos"])
    assert {(r["text"], r["label"], r["block"]) for r in ds.take_all()} >= {("dull film", 0, -1), ("fine film", 1, -1)}

    unseen = _write_csv(tmp_path / "new.csv", "text,label", ["a,pos", "b,meh", "c,wow"])
    with pytest.raises(DataError, match=r"labels never seen in training .*'meh', 'wow'; relabel or drop"):
        read_labelled_file(unseen, _cfg({}).data, ["neg", "pos"])
    with pytest.raises(DataError, match=r"data.eval_path .*new.csv' has labels never seen in training"):
        split_data(_cfg({"source": train, "eval_path": unseen}))


def test_data_labels_fix_the_label_order(ray_local, tmp_path):
    texts, labels = _labelled_rows(20, ["pos", "neg"])
    path = _write_csv(tmp_path / "d.csv", "text,label", [f"{t},{y}" for t, y in zip(texts, labels)])
    split = split_data(_cfg({"source": path, "labels": ["pos", "neg", "neutral"], "eval_fraction": 0.0}))
    assert split.label_names == ["pos", "neg", "neutral"]
    assert all(split.label_names[r["label"]] == r["text"].rsplit(" ", 1)[1] for r in split.dataset.take_all())
    with pytest.raises(DataError, match=r"labels not in data.labels \['pos'\]: 'neg'; add them to data.labels"):
        split_data(_cfg({"source": path, "labels": ["pos"]}))


@pytest.mark.parametrize(
    "name, content, data, message",
    [
        ("missing.csv", None, {}, r"data.source '.*missing.csv' does not exist; point data.source at"),
        ("d.txt", b"text,label\na,b\n", {}, r"cannot tell the format of .* set data.format"),
        ("d.parquet", b"not parquet", {}, r"cannot read data.source '.*d.parquet' as parquet: .*; check the file"),
        ("d.jsonl", b'{"text": "caf\xe9", "label": 1}\n', {}, r"as jsonl: it is not valid UTF-8; re-encode"),
        ("d.csv", b"review,label\na,b\n", {}, r"has no column 'text' \(columns found: review, label\); set data.text_column"),
        ("d.csv", b"text,y\na,b\n", {}, r"has no column 'label' \(columns found: text, y\); set data.label_column"),
        ("d.jsonl", b'{"body": "a", "label": 1}\n', {}, r"has no column 'text' \(columns found: body, label\)"),
        ("d.csv", b"text,label\n", {}, r"has no rows; point data.source at a file with data"),
        ("d.csv", b"text,label\na,x\nb,y\n", {"labels": ["x", "y", "x"]}, r"names a label twice; list each label once"),
        ("d.csv", b"text,label\na,x\n   ,y\n,x\nb,y\n", {}, r": 2 of 4 rows have empty, whitespace-only or null text; drop or fill"),
        ("d.csv", b"text,label\na,1\nb,\nc,2\n", {}, r": 1 of 3 rows have no label \(null or empty 'label'\); drop or label"),
        ("d.csv", b"text,label\na,x\nb,x\nc,x\n", {}, r"has a single class 'x'; a classifier needs at least two"),
        (
            "d.csv",
            b"text,label\n" + b"".join(b"t%d,%s\n" % (i, b"ab"[i % 2 : i % 2 + 1]) for i in range(40)),
            {"eval_fraction": 0.0},
            r"^fewer rows than k blocks can hold: block \d has \d+ rows but one batch across workers needs 32; "
            r"lower method.k or student.batch_size, or add data$",
        ),
    ],
)
def test_validation_errors_name_problem_and_fix(ray_local, tmp_path, name, content, data, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    cfg = _cfg({"source": str(path), **data}, k=2, batch_size=16, cluster={"workers": 2})
    with pytest.raises(DataError, match=message) as err:
        split_data(cfg)
    assert "\n" not in str(err.value)


def test_empty_holdout_is_an_error_unless_eval_fraction_is_zero(ray_local, tmp_path):
    path = _write_csv(tmp_path / "d.csv", "text,label", ["a,x", "b,y", "c,x", "d,y"])
    with pytest.raises(DataError, match=r"^the holdout is empty: data.eval_fraction 0.001 of 4 rows kept none; raise"):
        split_data(_cfg({"source": path, "eval_fraction": 0.001}))
    assert split_data(_cfg({"source": path, "eval_fraction": 0.0})).holdout_size == 0
