"""Holdout evaluation: accuracy, macro-F1, NLL and ECE from additive per-batch statistics.

Two ways in, one computation (:mod:`incr_ray.method.metrics`): :func:`evaluate_slice` runs a
model already in memory over batches (the training workers, right after saving: the saved model
loaded as every scorer loads it, on the holdout, the validation slice, the retention sample), and
:func:`evaluate_model` loads a saved model into a Ray Data actor pool (``incr-ray evaluate``, and a
generation whose workers stopped before evaluating).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from ..config import Config
from ..method import calibration
from ..method.calibration import fit_temperature
from ..method.metrics import STAT_KEYS, batch_stats, finalize, merge_stats, probs_metrics
from ..method.targets import padded_probs, softmax
from ..modeling import classifier_logits, load_for_inference
from ..storage import read_bytes, write_bytes_atomic
from .resources import require_resolved
from .visibility import require_visible
from .teacher import absorb_restart_warning, as_config, scoring_pool


def _stats(model, tokenizer, batch: dict[str, np.ndarray], cfg: Config, device=None,
           temperatures: tuple[float, ...] = (1.0,), num_classes: int | None = None):
    """Statistics of ``batch``, one per temperature, and its rows' predicted classes.
    ``num_classes``: the label map's size when the model knows fewer classes (an earlier
    generation of a run whose label map grew): its probabilities are padded with zeros for the
    others, so a row of a class it does not know counts as wrong, at NLL −log 1e-12."""
    logits = classifier_logits(model, tokenizer, [str(t) for t in batch["text"]], cfg.model.max_length, device)
    labels = np.asarray(batch["label"], dtype=np.int64)
    width = max(num_classes or 0, logits.shape[1])
    stats = [batch_stats(padded_probs(softmax(logits, t), width), labels, num_bins=cfg.eval.ece_bins)
             for t in temperatures]
    return stats, logits.argmax(axis=1) if len(logits) else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Share:
    """Who scores what when every rank of a torch.distributed group sees the same batches:
    ``scorers`` (ranks that hold a model and score; the others only join the collectives),
    this ``rank`` and the group's ``world``. ``Share()`` is one process scoring everything."""

    rank: int = 0
    world: int = 1
    scorers: tuple[int, ...] | None = None  # None: every rank

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(range(self.world)) if self.scorers is None else self.scorers

    @property
    def scores(self) -> bool:
        return self.rank in self.ranks


def regroup(batches: Iterable[dict[str, np.ndarray]], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The same rows, in order, in batches of exactly ``rows`` (the last one shorter)."""
    pending: list[dict[str, np.ndarray]] = []
    held = 0
    for batch in batches:
        n = len(batch["label"])
        if not n:
            continue
        pending.append({k: np.asarray(v) for k, v in batch.items()})
        held += n
        while held >= rows:
            whole = {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}
            yield {k: v[:rows] for k, v in whole.items()}
            rest = {k: v[rows:] for k, v in whole.items()}
            held -= rows
            pending = [rest] if held else []
    if held:
        yield {k: np.concatenate([b[k] for b in pending]) for k in pending[0]}


def my_rows(batches: Iterable[dict[str, np.ndarray]], share: Share, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """This rank's rows of every step: the batches are regrouped into ``batch_size`` rows per
    scorer and step, and scorer ``i`` takes the ``i``-th run of ``batch_size`` rows, so each
    forward carries ``eval.batch_size`` rows however many ranks score. A rank that does not score
    reads nothing."""
    if not share.scores:
        return
    i, parts = share.ranks.index(share.rank), len(share.ranks)
    for batch in regroup(batches, batch_size * parts):
        mine = {k: v[i * batch_size:(i + 1) * batch_size] for k, v in batch.items()}
        if len(mine["label"]):
            yield mine


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


def _gathered(parts: list[np.ndarray], world: int, empty: np.ndarray | None = None) -> np.ndarray:
    """This rank's arrays concatenated, then those of every rank (rank order) on every rank.
    ``empty``: what a rank without parts contributes (by default a 1-d array of none)."""
    mine = np.concatenate(parts) if parts else (np.zeros(0) if empty is None else empty)
    if world == 1:
        return mine
    every = [None] * world
    dist.all_gather_object(every, mine)
    return np.concatenate(every)


def _no_rows(num_classes: int, cfg: Config) -> dict[str, np.ndarray]:
    return batch_stats(np.zeros((0, num_classes)), np.zeros(0, dtype=np.int64), num_bins=cfg.eval.ece_bins)


class Scored(NamedTuple):
    """What :func:`evaluate_slice` measured: ``metrics`` (one dict per temperature),
    ``predictions`` (``(row_ids, classes)``, or None) and ``counts``: ``{"rows", "correct"}`` per
    true class (lists; the argmax, so any temperature's)."""

    metrics: list[dict[str, float]]
    predictions: tuple[np.ndarray, np.ndarray] | None
    counts: dict[str, list[int]]


def evaluate_slice(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                   share: Share = Share(), temperatures: tuple[float, ...] = (1.0,), predictions: bool = False,
                   num_classes: int | None = None) -> Scored:
    """Metrics of an in-memory model over numpy batches with ``text`` and ``label`` (and ``row_id``
    when ``predictions``): one metrics dict per temperature, with ``predictions`` the
    ``(row_ids, predicted classes)`` of every row, gathered on every rank, and the rows and
    correct predictions per class (:class:`Scored`).

    With ``share.world > 1`` (a torch.distributed group whose ranks all see the same batches) each
    scoring rank scores its :func:`my_rows` and the statistics are summed over the group: the
    slice is evaluated once, not once per rank. A rank that does not score passes ``model=None``
    and ``num_classes``; it takes part in the collectives only.
    """
    if model is not None:
        model.eval()
        num_classes = model.config.num_labels
    per_t: list[list[dict]] = [[_no_rows(num_classes, cfg)] for _ in temperatures]
    ids, preds = [], []
    for batch in my_rows(batches, share, cfg.eval.batch_size):
        stats, pred = _stats(model, tokenizer, batch, cfg, device, temperatures=temperatures)
        for acc, st in zip(per_t, stats):
            acc.append(st)
        if predictions:
            ids.append(np.asarray(batch["row_id"], dtype=np.int64))
            preds.append(pred)
    metrics = []
    for acc in per_t:
        merged = merge_stats(acc)
        summed = sum_over_ranks(merged, device) if share.world > 1 else merged
        metrics.append(finalize(summed))
    found = ((_gathered(ids, share.world).astype(np.int64), _gathered(preds, share.world).astype(np.int64))
             if predictions else None)
    confusion = np.asarray(summed["confusion"], dtype=np.int64)
    return Scored(metrics, found, {"rows": confusion.sum(axis=1).tolist(), "correct": np.diag(confusion).tolist()})


def slice_logits(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                 share: Share = Share(), num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, logits)`` of every row of a (small) slice, gathered on every rank in one order."""
    if model is not None:
        model.eval()
        num_classes = model.config.num_labels
    labels, logits = [], []
    for batch in my_rows(batches, share, cfg.eval.batch_size):
        texts = [str(t) for t in batch["text"]]
        logits.append(classifier_logits(model, tokenizer, texts, cfg.model.max_length, device))
        labels.append(np.asarray(batch["label"], dtype=np.int64))
    return (_gathered(labels, share.world).astype(np.int64),
            _gathered(logits, share.world, np.zeros((0, num_classes), dtype=np.float32)))


def holdout_metrics(model, tokenizer, batches: Iterable[dict[str, np.ndarray]], cfg: Config, device=None,
                    share: Share = Share()) -> dict[str, float]:
    """:func:`evaluate_slice` at temperature 1: the metrics alone."""
    return evaluate_slice(model, tokenizer, batches, cfg, device, share)[0][0]


EXTENSION_HOLDOUT = "holdout_gen_"  # slice name prefix of an extension's own holdout: + its generation


def evaluate_student(model, tokenizer, slices: dict[str, Iterable[dict[str, np.ndarray]]], cfg: Config,
                     device=None, share: Share = Share(), num_classes: int | None = None,
                     fold: Callable[[float], None] | None = None) -> dict:
    """Everything a training worker measures on the student it just trained.

    A slice of fewer than ``calibration.MIN_ROWS`` rows fits no temperature (T stays 1).

    ``slices`` maps ``holdout`` (required), ``validation``, ``retention`` and
    ``holdout_gen_<j>`` (an extension's own holdout; optional) to their batches. With a validation
    slice and ``method.calibrate``, a temperature is fitted on it first. ``fold(T)``, when given,
    then divides the model's head by T, on disk and in this ``model`` alike (the recipe's
    :func:`incr_ray.modeling.fold_temperature`): the holdout is scored once, on the folded model,
    so ``holdout`` is exactly the saved folder's figures, and the ``calibration`` record's
    ``*_before`` figures are those logits times T (the unfolded model's, up to the head's
    rounding). Without ``fold`` the holdout is scored at temperatures 1 and T.

    Returns ``holdout`` (metrics of the model as it will be saved, i.e. calibrated when
    calibrating), ``predictions`` (holdout row ids and classes), ``class_counts`` (rows and
    correct predictions per class on the holdout, ``holdout``, and on each extension's own,
    ``j``), and when measured ``validation``, ``calibration`` and ``retention``, and ``drift``
    (``{j: metrics}`` on the extensions' own holdouts).
    """
    out: dict = {}
    temperature = 1.0
    if "validation" in slices:
        labels, logits = slice_logits(model, tokenizer, slices["validation"], cfg, device, share, num_classes)
        if len(labels):
            if cfg.method.calibrate and len(labels) >= calibration.MIN_ROWS:
                temperature = fit_temperature(logits, labels)
            out["validation"] = {"rows": len(labels), **probs_metrics(softmax(logits, temperature), labels,
                                                                       cfg.eval.ece_bins)}
    folded = fold is not None and temperature != 1.0
    if folded:
        fold(temperature)
    # (before, after) calibration; one temperature when there is none to apply.
    temperatures = (1 / temperature, 1.0) if folded else (1.0, temperature) if temperature != 1.0 else (1.0,)
    after = 1.0 if folded else temperature  # what the saved model's probabilities are
    metrics, out["predictions"], counts = evaluate_slice(model, tokenizer, slices["holdout"], cfg, device, share,
                                                         temperatures, predictions=True, num_classes=num_classes)
    out["holdout"], out["class_counts"] = metrics[-1], {"holdout": counts}
    if cfg.method.calibrate:
        out["calibration"] = {"temperature": temperature, "nll_before": metrics[0]["nll"],
                              "ece_before": metrics[0]["ece"], "nll_after": metrics[-1]["nll"],
                              "ece_after": metrics[-1]["ece"]}
    if "retention" in slices:
        retained = evaluate_slice(model, tokenizer, slices["retention"], cfg, device, share, (after,),
                                  num_classes=num_classes)[0][0]
        out["retention"] = {"accuracy": retained["accuracy"], "nll": retained["nll"], "rows": retained["n"]}
    for name in sorted(n for n in slices if n.startswith(EXTENSION_HOLDOUT)):
        scored = evaluate_slice(model, tokenizer, slices[name], cfg, device, share, (after,), num_classes=num_classes)
        j, m = str(int(name[len(EXTENSION_HOLDOUT):])), scored.metrics[0]
        out.setdefault("drift", {})[j] = {"accuracy": m["accuracy"], "nll": m["nll"], "rows": m["n"]}
        out["class_counts"][j] = scored.counts
    return out


class HoldoutStatsScorer:
    """``map_batches`` class: one row of additive statistics per batch, with the batch's row ids
    and predicted classes. ``num_classes``: the label map's size, when the model may know fewer."""

    def __init__(self, model_path: str, cfg: Config | dict[str, Any], on_gpu: bool, num_classes: int | None = None):
        require_visible({"storage.path (the model)": model_path}, "an evaluation actor")
        self.cfg = as_config(cfg)
        self.num_classes = num_classes
        self.model, self.tokenizer = load_for_inference(model_path, self.cfg, on_gpu)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        (stats,), pred = _stats(self.model, self.tokenizer, batch, self.cfg, num_classes=self.num_classes)
        out = {k: np.asarray(stats[k])[None, ...] for k in STAT_KEYS}
        if "row_id" in batch:
            out["row_ids"] = np.asarray([np.asarray(batch["row_id"], dtype=np.int64)], dtype=object)
            out["preds"] = np.asarray([pred.astype(np.int64)], dtype=object)
        return out


def evaluate_model(ds, model_path: str, cfg: Config, on_gpu: bool, predictions: bool = False,
                   num_classes: int | None = None) -> dict[str, float] | tuple[dict[str, float], tuple[np.ndarray, np.ndarray]]:
    """Holdout metrics of the saved model at ``model_path`` on ``ds``; with ``predictions`` also the
    ``(row_ids, predicted classes)`` of its rows. ``num_classes``: the size of the label map
    ``ds``'s labels index, when the model may know fewer classes (an earlier generation of a run
    whose label map grew): a row of a class it does not know counts as wrong."""
    ds = ds.materialize()  # see score_block
    absorb_restart_warning()
    cfg = require_resolved(cfg, "evaluate_model")
    resources, actor_gpu = scoring_pool(cfg, on_gpu)
    stats_ds = ds.map_batches(
        HoldoutStatsScorer,
        fn_constructor_kwargs={"model_path": model_path, "cfg": cfg.to_dict(), "on_gpu": actor_gpu,  # plain values
                               "num_classes": num_classes},
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
