"""Holdout evaluation: accuracy, macro-F1, NLL and ECE from additive per-batch statistics.

Two ways in, one computation (:mod:`incr_ray.method.metrics`): :func:`evaluate_slice` runs a
model already in memory over batches (the training workers, right after training: the holdout,
the validation slice, the retention sample), and
:func:`evaluate_model` loads a saved model into a Ray Data actor pool (``incr-ray evaluate``, and a
generation whose workers stopped before evaluating).
"""

from __future__ import annotations

import io
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from ..config import Config
from ..method import calibration
from ..method.calibration import fit_temperature
from ..method.metrics import STAT_KEYS, batch_stats, finalize, merge_stats, probs_metrics
from ..method.targets import softmax
from ..modeling import classifier_logits, load_for_inference
from ..storage import read_bytes, write_bytes_atomic
from .resources import require_resolved
from .teacher import absorb_restart_warning, as_config, scoring_pool


def _stats(model, tokenizer, batch: dict[str, np.ndarray], cfg: Config, device=None, keep: int | None = None,
           temperatures: tuple[float, ...] = (1.0,)):
    """Statistics of the first ``keep`` rows of ``batch`` (all by default), one per temperature, and
    those rows' predicted classes; every row is scored."""
    logits = classifier_logits(model, tokenizer, [str(t) for t in batch["text"]], cfg.model.max_length, device)[:keep]
    labels = np.asarray(batch["label"], dtype=np.int64)[:keep]
    stats = [batch_stats(softmax(logits, t), labels, num_bins=cfg.eval.ece_bins) for t in temperatures]
    return stats, logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)


def rank_slice(n: int, rank: int, world: int) -> tuple[np.ndarray, int]:
    """Rows of an ``n``-row batch that ``rank`` scores — every ``world``-th, padded with row 0 to
    ``ceil(n / world)`` so all ranks run the same forwards — and how many of them are real."""
    mine = np.arange(rank, n, world)
    padded = np.concatenate([mine, np.zeros(-(-n // world) - len(mine), dtype=np.int64)])
    return padded, len(mine)


def sum_over_ranks(stats: dict[str, np.ndarray], device) -> dict[str, np.ndarray]:
    """All-reduce (sum) of :func:`batch_stats` statistics over the torch.distributed group."""
    flat = np.concatenate([np.asarray(stats[k], dtype=np.float64).ravel() for k in STAT_KEYS])
    total = torch.from_numpy(flat).to(device)
    dist.all_reduce(total)  # float64 keeps the integer counts exact up to 2**53
    out, at, summed = {}, 0, total.cpu().numpy()
    for k in STAT_KEYS:
        value = np.asarray(stats[k])
        out[k] = summed[at:at + value.size].reshape(value.shape).astype(value.dtype)
        at += value.size
    return out


def _gathered(parts: list[np.ndarray], world: int) -> np.ndarray:
    """This rank's arrays concatenated, then those of every rank (rank order) on every rank."""
    mine = np.concatenate(parts) if parts else np.zeros(0)
    if world == 1:
        return mine
    every = [None] * world
    dist.all_gather_object(every, mine)
    return np.concatenate(every)


def _rows_of_each_rank(batches, rank: int, world: int):
    """Each batch's rows that ``rank`` scores (:func:`rank_slice`) and how many of them are real."""
    for batch in batches:
        rows, real = rank_slice(len(batch["label"]), rank, world)
        yield {k: np.asarray(v)[rows] for k, v in batch.items()}, real


def evaluate_slice(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                   rank: int = 0, world: int = 1, temperatures: tuple[float, ...] = (1.0,),
                   predictions: bool = False) -> tuple[list[dict[str, float]], tuple[np.ndarray, np.ndarray] | None]:
    """Metrics of an in-memory model over numpy batches with ``text`` and ``label`` (and ``row_id``
    when ``predictions``): one metrics dict per temperature, and with ``predictions`` the
    ``(row_ids, predicted classes)`` of every row, gathered on every rank.

    With ``world > 1`` (a torch.distributed group whose ranks all see the same batches) each rank
    scores its :func:`rank_slice` of every batch and the statistics are summed over the group: the
    slice is evaluated once, not once per rank, and under ZeRO-3 every rank still runs the same
    number of forwards, as the parameter gathers require.
    """
    model.eval()
    per_t: list[list[dict]] = [[] for _ in temperatures]
    ids, preds = [], []
    for batch, real in _rows_of_each_rank(batches, rank, world):
        stats, pred = _stats(model, tokenizer, batch, cfg, device, keep=real, temperatures=temperatures)
        for acc, st in zip(per_t, stats):
            acc.append(st)
        if predictions:
            ids.append(np.asarray(batch["row_id"], dtype=np.int64)[:real])
            preds.append(pred)
    metrics = []
    for acc in per_t:
        merged = merge_stats(acc)
        metrics.append(finalize(sum_over_ranks(merged, device) if world > 1 else merged))
    found = (_gathered(ids, world).astype(np.int64), _gathered(preds, world).astype(np.int64)) if predictions else None
    return metrics, found


def slice_logits(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                 rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` of every row of a (small) slice, gathered on every rank in one order."""
    model.eval()
    labels, logits = [], []
    for batch, real in _rows_of_each_rank(batches, rank, world):
        texts = [str(t) for t in batch["text"]]
        logits.append(classifier_logits(model, tokenizer, texts, cfg.model.max_length, device)[:real])
        labels.append(np.asarray(batch["label"], dtype=np.int64)[:real])
    num_classes = model.config.num_labels
    return (_gathered(labels, world).astype(np.int64),
            _gathered(logits, world).reshape(-1, num_classes) if logits else np.zeros((0, num_classes)))


def holdout_metrics(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                    rank: int = 0, world: int = 1) -> dict[str, float]:
    """:func:`evaluate_slice` at temperature 1: the metrics alone."""
    return evaluate_slice(model, tokenizer, batches, cfg, device, rank, world)[0][0]


EXTENSION_HOLDOUT = "holdout_gen_"  # slice name prefix of an extension's own holdout: + its generation


def evaluate_student(model, tokenizer, slices: dict[str, Iterable[dict[str, np.ndarray]]], cfg: Config,
                     device=None, rank: int = 0, world: int = 1) -> dict:
    """Everything a training worker measures on the student it just trained.

    A slice of fewer than ``calibration.MIN_ROWS`` rows fits no temperature (T stays 1).

    ``slices`` maps ``holdout`` (required), ``validation``, ``retention`` and
    ``holdout_gen_<j>`` (an extension's own holdout; optional) to their batches. With a validation slice and ``method.calibrate``, a temperature is fitted on it first;
    the holdout is then scored once at temperature 1 and at that temperature. Returns ``holdout``
    (metrics of the model as it will be saved, i.e. calibrated when calibrating), ``predictions``
    (holdout row ids and classes), and when measured ``validation``, ``calibration`` and
    ``retention``, and ``drift`` (``{j: metrics}`` on the extensions' own holdouts).
    """
    out: dict = {}
    temperature = 1.0
    if "validation" in slices:
        labels, logits = slice_logits(model, tokenizer, slices["validation"], cfg, device, rank, world)
        if len(labels):
            if cfg.method.calibrate and len(labels) >= calibration.MIN_ROWS:
                temperature = fit_temperature(logits, labels)
            out["validation"] = {"rows": len(labels), **probs_metrics(softmax(logits, temperature), labels,
                                                                       cfg.eval.ece_bins)}
    temperatures = (1.0, temperature) if temperature != 1.0 else (1.0,)
    metrics, out["predictions"] = evaluate_slice(model, tokenizer, slices["holdout"], cfg, device, rank, world,
                                                 temperatures, predictions=True)
    out["holdout"] = metrics[-1]
    if cfg.method.calibrate:
        out["calibration"] = {"temperature": temperature, "nll_before": metrics[0]["nll"],
                              "ece_before": metrics[0]["ece"], "nll_after": metrics[-1]["nll"],
                              "ece_after": metrics[-1]["ece"]}
    if "retention" in slices:
        retained = evaluate_slice(model, tokenizer, slices["retention"], cfg, device, rank, world, (temperature,))[0][0]
        out["retention"] = {"accuracy": retained["accuracy"], "nll": retained["nll"], "rows": retained["n"]}
    for name in sorted(n for n in slices if n.startswith(EXTENSION_HOLDOUT)):
        m = evaluate_slice(model, tokenizer, slices[name], cfg, device, rank, world, (temperature,))[0][0]
        out.setdefault("drift", {})[str(int(name[len(EXTENSION_HOLDOUT):]))] = {
            "accuracy": m["accuracy"], "nll": m["nll"], "rows": m["n"]}
    return out


class HoldoutStatsScorer:
    """``map_batches`` class: one row of additive statistics per batch, with the batch's row ids
    and predicted classes."""

    def __init__(self, model_path: str, cfg: Config | dict[str, Any], on_gpu: bool):
        self.cfg = as_config(cfg)
        self.model, self.tokenizer = load_for_inference(model_path, self.cfg, on_gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (stats,), pred = _stats(self.model, self.tokenizer, batch, self.cfg)
        out = {k: np.asarray(stats[k])[None, ...] for k in STAT_KEYS}
        if "row_id" in batch:
            out["row_ids"] = np.asarray([np.asarray(batch["row_id"], dtype=np.int64)], dtype=object)
            out["preds"] = np.asarray([pred.astype(np.int64)], dtype=object)
        return out


def evaluate_model(ds, model_path: str, cfg: Config, on_gpu: bool,
                   predictions: bool = False) -> dict[str, float] | tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Holdout metrics of the saved model at ``model_path`` on ``ds``; with ``predictions`` also the
    ``(row_ids, predicted classes)`` of its rows."""
    ds = ds.materialize()  # see score_block
    absorb_restart_warning()
    cfg = require_resolved(cfg, "evaluate_model")
    resources, actor_gpu = scoring_pool(cfg, on_gpu)
    stats_ds = ds.map_batches(
        HoldoutStatsScorer,
        fn_constructor_kwargs={"model_path": model_path, "cfg": cfg.to_dict(), "on_gpu": actor_gpu},  # plain values
        batch_size=cfg.eval.batch_size,
        **resources,
    )
    rows = stats_ds.take_all()  # one small row per batch, not per example
    metrics = finalize(merge_stats([{k: np.asarray(r[k]) for k in STAT_KEYS} for r in rows]))
    if not predictions:
        return metrics
    ids = [np.asarray(r["row_ids"], dtype=np.int64) for r in rows if "row_ids" in r]
    preds = [np.asarray(r["preds"], dtype=np.int64) for r in rows if "preds" in r]
    return metrics, (np.concatenate(ids) if ids else np.zeros(0, np.int64),
                     np.concatenate(preds) if preds else np.zeros(0, np.int64))


def write_predictions(path: str, row_ids: np.ndarray, classes: np.ndarray) -> None:
    """``row_id, pred`` Parquet at ``path`` (local or remote), written whole then renamed."""
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"row_id": pa.array(row_ids, pa.int64()), "pred": pa.array(classes, pa.int64())}), buf)
    write_bytes_atomic(path, buf.getvalue().to_pybytes())


def read_predictions(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(row_ids, classes)`` written by :func:`write_predictions`."""
    table = pq.read_table(io.BytesIO(read_bytes(path)))
    return table.column("row_id").to_numpy(), table.column("pred").to_numpy()
