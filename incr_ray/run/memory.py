"""The representative memory of a generation (``replay.per_class``; End-to-End Incremental
Learning, Castro et al. 2018): which rows of the old classes a student replays, stored as
``gen_<g>/memory.parquet`` and counted in run.json (``memory``).

``replay.selection: uniform`` takes the memory straight from the candidates
(:func:`incr_ray.data.memory_candidates` with ``per_class`` rows a class): no teacher needed.
``herding`` has the teacher score ``candidates_per_class`` rows a class together with the block, in
the same pass, and keep their features (``teacher_features``); :func:`herd` then picks
``per_class`` of each class on them (:func:`incr_ray.method.herding.class_memory`), and
:func:`keep_memory` keeps only the picks as the generation's replay rows, in ``gen_<g>/targets``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config
from ..data.replay import MEMORY_PURPOSE
from ..generation.teacher import FEATURES
from ..method.hashing import hash_ids
from ..method.herding import class_memory
from ..storage import parquet_batches, write_bytes_atomic

BATCH = 4096
COLUMNS = ["row_id", "label", "label_id", "block", "rank", "distance", "selection"]


def uniform_ranks(ids: np.ndarray, labels: np.ndarray, run_seed: int) -> np.ndarray:
    """Each row's place in its class's seeded sample (0 first): the order the candidates were
    drawn in (:func:`incr_ray.method.hashing.per_class_sample`, by hash, then row id)."""
    ids, labels = np.asarray(ids, np.int64), np.asarray(labels)
    keys = hash_ids(ids, run_seed, MEMORY_PURPOSE)
    order = np.lexsort((ids, keys, labels))
    first = np.searchsorted(labels[order], labels[order], side="left")
    ranks = np.empty(len(ids), np.int64)
    ranks[order] = np.arange(len(ids)) - first
    return ranks


def herd(scored_path: str, per_class: int) -> tuple[dict[str, np.ndarray], int]:
    """Herding over the replay candidates a teacher scored (``scored_path``: its Parquet, with
    ``teacher_features`` on the candidates): (``row_id``, ``label``, ``block``, ``rank`` and
    ``distance`` of the ``per_class`` picks of every class; the number of candidates).
    The candidates are taken in row-id order (a repeated row once), so the picks do not depend on
    how Ray Data cut the rows into blocks."""
    parts: dict[str, list] = {"row_id": [], "label": [], "block": [], "features": []}
    for batch in parquet_batches(scored_path, ["row_id", "label", "block", "replay", FEATURES], BATCH):
        replay = batch.column("replay").to_numpy(zero_copy_only=False).astype(bool)
        if not replay.any():
            continue
        chosen = batch.filter(pa.array(replay))
        feats = chosen.column(FEATURES)
        parts["features"].append(np.asarray(feats.flatten(), np.float64).reshape(len(feats), -1))
        for name in ("row_id", "label", "block"):
            parts[name].append(chosen.column(name).to_numpy().astype(np.int64))
    if not parts["row_id"]:
        empty = np.empty(0, np.int64)
        return {"row_id": empty, "label": empty, "block": empty, "rank": empty, "distance": np.empty(0)}, 0
    ids = np.concatenate(parts["row_id"])
    _, first = np.unique(ids, return_index=True)  # sorted by row id, each once
    pool = {name: np.concatenate(v)[first] for name, v in parts.items()}
    index, rank, distance = class_memory(pool["features"], pool["label"], per_class)
    return ({"row_id": pool["row_id"][index], "label": pool["label"][index], "block": pool["block"][index],
             "rank": rank, "distance": distance}, len(first))


def keep_memory(batch: pa.Table, ids: np.ndarray) -> pa.Table:
    """``map_batches`` function over a scored generation: the block's own rows and the replay rows
    whose id is in ``ids`` (the memory), without the candidates' features."""
    replay = batch.column("replay").to_numpy(zero_copy_only=False).astype(bool)
    keep = ~replay | np.isin(batch.column("row_id").to_numpy(), ids)
    if FEATURES in batch.column_names:
        batch = batch.drop_columns([FEATURES])
    return batch.filter(pa.array(keep))


def memory_table(picks: dict[str, np.ndarray], label_names: list[str], selection: str) -> pa.Table:
    """gen_<g>/memory.parquet: one row per exemplar, by class, then rank. ``distance`` (herding):
    how far the mean of its class's picks up to this one lies from the class mean of the
    candidates' L2-normalised teacher features; null for a uniform memory."""
    order = np.lexsort((picks["rank"], picks["label"]))
    names = np.asarray(label_names, dtype=object)
    n = len(order)
    distance = (pa.array(np.asarray(picks["distance"], np.float64)[order], pa.float64()) if "distance" in picks
                else pa.nulls(n, pa.float64()))
    return pa.table({
        "row_id": pa.array(picks["row_id"][order].astype(np.int64)),
        "label": pa.array([str(x) for x in names[picks["label"][order]]], pa.string()),
        "label_id": pa.array(picks["label"][order].astype(np.int64)),
        "block": pa.array(picks["block"][order].astype(np.int64)),
        "rank": pa.array(picks["rank"][order].astype(np.int64)),
        "distance": distance,
        "selection": pa.array([selection] * n, pa.string()),
    })


def memory_record(table: pa.Table, cfg: Config, path: str, candidates: int) -> dict[str, Any]:
    """What run.json keeps of a generation's memory (``entry.memory``)."""
    labels = table.column("label").to_pylist()
    per_label = {name: labels.count(name) for name in dict.fromkeys(labels)}
    out: dict[str, Any] = {"path": path, "selection": cfg.replay.selection, "per_class": cfg.replay.per_class,
                           "rows": table.num_rows, "classes": len(per_label), "candidates": candidates,
                           "per_label": per_label}
    if cfg.replay.selection == "herding" and table.num_rows:
        ranks = np.asarray(table.column("rank").to_pylist())
        last = ranks == np.array([per_label[x] - 1 for x in labels])
        # How well each class's whole memory stands for it: its mean's distance to the class mean.
        out["mean_distance"] = float(np.mean(np.asarray(table.column("distance").to_pylist())[last]))
    return out


def memory_line(g: int, record: dict[str, Any]) -> str:
    """The console's line about generation ``g``'s memory."""
    how = ("by herding on the teacher's features" if record["selection"] == "herding"
           else "at random (seeded)")
    distance = f", mean distance to the class means {record['mean_distance']:.3f}" if "mean_distance" in record else ""
    short = [name for name, n in record["per_label"].items() if n < record["per_class"]]
    fewer = f"; fewer rows than that of {', '.join(map(repr, short))}" if short else ""
    return (f"[gen {g}] memory: {record['rows']} rows of {record['classes']} old classes (up to {record['per_class']} "
            f"a class{fewer}), chosen {how} from {record['candidates']} candidates{distance}; {record['path']}")


def write_memory(run, g: int, entry, picks: dict[str, np.ndarray], candidates: int) -> None:
    """gen_<g>/memory.parquet, its record in run.json's ``entry`` (saved by the caller) and its console
    line. ``run``: the open :class:`incr_ray.run.folder.Run`."""
    table = memory_table(picks, run.manifest.label_names_of(g), run.cfg.replay.selection)
    dest = run.paths.memory(g)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    write_bytes_atomic(dest, buf.getvalue().to_pybytes())
    entry.memory = memory_record(table, run.cfg, run.rel(dest), candidates)
    run.say(memory_line(g, entry.memory))
