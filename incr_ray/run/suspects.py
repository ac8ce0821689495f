"""Suspected label errors of a run: found in a generation's stored targets, written beside them as
``gen_<g>/suspects.parquet``, listed by ``incr-ray suspects``, and the training rows under
``method.suspects`` (the arithmetic is :mod:`incr_ray.method.suspects`).

The teacher's probabilities are already stored with every row it scored (``gen_<g>/targets``), so
finding the suspects is a pass over that Parquet on the driver — no model, no Ray.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config
from ..method.suspects import (TREATED, apply_policy, at_unit_temperature, contradiction, most_confident_first,
                               suspect_mask)
from ..storage import parquet_batches, read_bytes, write_bytes_atomic

BATCH = 4096
COLUMNS = ["row_id", "text", "label", "teacher_class", "teacher_prob", "label_prob"]


def _numpy(column) -> np.ndarray:
    """A column of a pyarrow Table (chunked) or RecordBatch as numpy."""
    return column.to_numpy() if isinstance(column, pa.ChunkedArray) else column.to_numpy(zero_copy_only=False)


def _matrix(column) -> np.ndarray:
    """The ``(n, C)`` float64 matrix of a list column whose rows all hold C values."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return np.asarray(column.flatten(), dtype=np.float64).reshape(len(column), -1)


def _own_rows(batch) -> np.ndarray:
    """The block's own rows of a targets batch (replay rows are earlier blocks')."""
    if "replay" not in batch.schema.names:
        return np.ones(batch.num_rows, dtype=bool)
    return ~_numpy(batch.column("replay")).astype(bool)


def find_suspects(targets_path: str, cfg: Config, label_names: list[str],
                  teacher_classes: int | None = None) -> tuple[pa.Table, int]:
    """(the suspects of a generation's own block rows, most confident contradiction first, with
    the columns :data:`COLUMNS` — labels by name; how many block rows were looked at).
    ``teacher_classes``: the classes its teacher knows, when the generation added more (rows of
    those are no suspects)."""
    m = cfg.method
    found: dict[str, list] = {k: [] for k in COLUMNS}
    seen = 0
    names = np.asarray(label_names, dtype=object)
    for batch in parquet_batches(targets_path, ["row_id", "text", "label", "teacher_probs", "replay"], BATCH):
        own = _own_rows(batch)
        if not own.any():
            continue
        labels = batch.column("label").to_numpy().astype(np.int64)[own]
        probs = _matrix(batch.column("teacher_probs"))[own]
        seen += len(labels)
        mask = suspect_mask(probs, labels, m.suspect_below, m.temperature, teacher_classes)
        if not mask.any():
            continue
        top, top_prob, label_prob = contradiction(at_unit_temperature(probs[mask], m.temperature), labels[mask])
        found["row_id"].append(batch.column("row_id").to_numpy()[own][mask])
        found["text"].append(np.asarray(batch.column("text").to_pylist(), dtype=object)[own][mask])
        found["label"].append(names[labels[mask]])
        found["teacher_class"].append(names[top])
        found["teacher_prob"].append(top_prob)
        found["label_prob"].append(label_prob)
    if not found["row_id"]:
        empty = {"row_id": pa.array([], pa.int64()), "text": pa.array([], pa.string()),
                 "label": pa.array([], pa.string()), "teacher_class": pa.array([], pa.string()),
                 "teacher_prob": pa.array([], pa.float64()), "label_prob": pa.array([], pa.float64())}
        return pa.table(empty), seen
    cols = {k: np.concatenate(v) for k, v in found.items()}
    order = most_confident_first(cols["label_prob"], cols["teacher_prob"], cols["row_id"])
    table = pa.table({
        "row_id": pa.array(cols["row_id"][order].astype(np.int64)),
        "text": pa.array([str(t) for t in cols["text"][order]], pa.string()),
        "label": pa.array([str(x) for x in cols["label"][order]], pa.string()),
        "teacher_class": pa.array([str(x) for x in cols["teacher_class"][order]], pa.string()),
        "teacher_prob": pa.array(cols["teacher_prob"][order], pa.float64()),
        "label_prob": pa.array(cols["label_prob"][order], pa.float64()),
    })
    return table, seen


def write_suspects(dest: str, table: pa.Table) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes_atomic(dest, buf.getvalue().to_pybytes())


def read_suspects(path: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(path)))


def suspects_record(table: pa.Table, block_rows: int, cfg: Config, path: str) -> dict[str, Any]:
    """What run.json keeps of a generation's suspects."""
    m = cfg.method
    return {"path": path, "rows": table.num_rows, "block_rows": block_rows,
            "share": table.num_rows / block_rows if block_rows else 0.0, "below": m.suspect_below,
            "policy": m.suspects}


def record_suspects(run, g: int, entry) -> None:
    """gen_<g>/suspects.parquet from generation ``g``'s stored targets, its counts in its run.json
    ``entry`` (saved by the caller), one console line. ``run``: the open :class:`incr_ray.run.folder.Run`."""
    m = run.cfg.method
    table, block_rows = find_suspects(run.paths.join(entry.targets), run.cfg, run.manifest.label_names_of(g),
                                      len(run.manifest.teacher_labels(g)))
    dest = run.paths.suspects(g)
    write_suspects(dest, table)
    entry.suspects = suspects_record(table, block_rows, run.cfg, run.rel(dest))
    treated = TREATED[m.suspects]
    run.say(f"[gen {g}] suspected label errors: {table.num_rows} of {block_rows} block rows "
            f"({100 * entry.suspects['share']:.1f}%) get under {m.suspect_below:g} of the teacher for their label; "
            f"{treated} (method.suspects {m.suspects}); list them: incr-ray suspects --run {run.paths.root} "
            f"--generation {g}")


def training_rows(cfg: Config, teacher_classes: int | None = None):
    """A ``map_batches`` function (pyarrow batches of ``label``, ``target``, ``teacher_probs`` and
    ``replay``) that applies ``method.suspects`` to a generation's training rows: ``one_hot``
    replaces the suspects' targets by their label, ``drop`` leaves them out; replay rows, and rows
    of classes the teacher does not know (``teacher_classes``), are untouched. Returns the rows
    with ``row_id``, ``text``, ``label`` and ``target`` only."""
    m = cfg.method

    def apply(batch: pa.Table) -> pa.Table:
        kept = batch.select(["row_id", "text", "label", "target"])
        if not batch.num_rows:
            return kept
        labels = _numpy(batch.column("label")).astype(np.int64)
        probs, targets = _matrix(batch.column("teacher_probs")), _matrix(batch.column("target"))
        suspect = suspect_mask(probs, labels, m.suspect_below, m.temperature, teacher_classes) & _own_rows(batch)
        targets, keep = apply_policy(targets, labels, suspect, m.suspects)
        flat = pa.array(targets.reshape(-1), pa.float64())
        target = pa.FixedSizeListArray.from_arrays(flat, targets.shape[1]).cast(pa.list_(pa.float64()))
        return kept.set_column(3, "target", target).filter(pa.array(keep))

    return apply


def run_suspects(run_dir: str, generation: int | None = None) -> tuple[int, pa.Table, dict[str, Any]]:
    """(generation, its suspects, its run.json record) of the run folder ``run_dir``: the given
    generation, or the last that has suspects. Reads run.json and the Parquet only: no Ray."""
    from ..storage import absolute, exists
    from .manifest import RunError, load

    root = absolute(run_dir).rstrip("/")
    if not exists(f"{root}/run.json"):
        raise RunError(f"{run_dir!r} is not an incr-ray run folder (no run.json); pass --run STORAGE/RUN_NAME")
    gens = {e.index: e for e in load(f"{root}/run.json").generations}
    listed = [g for g, e in sorted(gens.items()) if e.suspects]
    if generation is None:
        if not listed:
            raise RunError(f"run {run_dir!r} has no suspects yet: generations from 1 on list them once their "
                           "teacher has scored (method.suspect_below > 0)")
        generation = listed[-1]
    elif generation not in listed:
        have = ", ".join(map(str, listed)) or "none yet"
        raise RunError(f"generation {generation} of {run_dir!r} has no suspects (generations with suspects: {have}); "
                       "generation 0 has no teacher")
    record = gens[generation].suspects
    path = record["path"] if "://" in record["path"] else f"{root}/{record['path']}"
    return generation, read_suspects(path), record
