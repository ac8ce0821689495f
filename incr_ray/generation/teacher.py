"""Teacher scoring: a model scores a block in a Ray Data actor pool.

:class:`TargetScorer` loads the teacher once per actor and turns each batch into the teacher's
softmax and the soft target of every row. Resources — pool size, CPUs and GPUs per actor, batch
size — are set at the ``map_batches`` call in :func:`score_block`, never inside the class.
:func:`teacher_block_stats` then reads back what the teacher and the target rule did on the block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import faults
from ..config import Config
from ..method.targets import (RULE_STAT_KEYS, finalize_rule_stats, merge_rule_stats, soft_targets, softmax,
                              target_rule_stats)
from ..modeling import classifier_logits, load_for_inference


class TargetScorer:
    """``map_batches`` class: adds ``teacher_probs`` and ``target`` to every row of a batch."""

    def __init__(self, model_path: str, cfg: Config, on_gpu: bool, progress=None):
        self.model, self.tokenizer = load_for_inference(model_path, cfg, on_gpu)
        self.max_length = cfg.model.max_length
        self.method = cfg.method
        self.batches = 0
        self.progress = progress  # a queue actor that counts the rows scored (ScoringProgress), or None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.batches += 1
        faults.kill_teacher_before_batch(self.batches)
        logits = classifier_logits(self.model, self.tokenizer, [str(t) for t in batch["text"]], self.max_length)
        probs = softmax(logits, self.method.temperature)
        labels = np.asarray(batch["label"], dtype=np.int64)
        target = soft_targets(probs, labels, threshold=self.method.threshold, floor=self.method.floor)
        if self.progress is not None:
            # Fire and forget: the count never waits on the driver, nor fails the batch.
            self.progress.put_nowait.remote(len(labels))
        return _with_list_columns(batch, teacher_probs=probs, target=target)


def _with_list_columns(batch: dict[str, np.ndarray], **matrices: np.ndarray) -> pa.Table:
    """The batch plus (n, C) matrices as plain list<double> columns, so the targets Parquet reads
    in pandas/pyarrow/Spark without Ray's tensor extension type."""
    cols = {k: pa.array(v) for k, v in batch.items()}
    for name, m in matrices.items():
        flat = pa.array(m.reshape(-1), pa.float64())
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, m.shape[1]).cast(pa.list_(pa.float64()))
    return pa.table(cols)


def scoring_pool(cfg: Config, on_gpu: bool) -> tuple[dict, bool]:
    """``map_batches`` resources for a scoring pool (teacher and holdout evaluation alike), and
    whether its actors use a GPU: only when they are given one, since Ray no longer hides the
    GPUs from an actor that asks for none."""
    # Ray is imported here, not at the top, so that the scorer classes import and run where Ray
    # is absent (benchmarks/gpu_check.py drives them on a bare GPU machine).
    from ray.data import ActorPoolStrategy

    t = cfg.teacher
    gpus = t.gpus_per_actor if on_gpu else 0
    resources = dict(compute=ActorPoolStrategy(size=t.pool_size), num_cpus=t.cpus_per_actor,
                     **({"num_gpus": gpus} if gpus > 0 else {}))
    return resources, gpus > 0


def score_block(ds, model_path: str, cfg: Config, on_gpu: bool, progress=None):
    """Teacher outputs for every row of ``ds`` (lazy): adds ``teacher_probs`` and ``target``.
    ``progress``: a queue actor each scoring actor tells how many rows it scored."""
    # Read before the actors start: a pool holding every CPU would starve its own read tasks.
    ds = ds.materialize()
    resources, actor_gpu = scoring_pool(cfg, on_gpu)
    return ds.map_batches(
        TargetScorer,
        fn_constructor_kwargs={"model_path": model_path, "cfg": cfg, "on_gpu": actor_gpu, "progress": progress},
        batch_size=cfg.teacher.batch_size,
        **resources,
    )


# Rows per batch when summarising stored targets: pure numpy on a few floats per row, so large
# batches keep the number of tasks (and of summary rows) small.
STATS_BATCH_SIZE = 4096


def _matrix(column) -> np.ndarray:
    """An ``(n, C)`` float64 matrix from a non-empty list column as Ray hands it to numpy batches
    (a 2-D array, or an object array of 1-D arrays)."""
    return np.stack([np.asarray(r, dtype=np.float64) for r in column])


def block_rule_stats(batch: dict[str, np.ndarray], threshold: float, floor: float | None,
                     temperature: float = 1.0) -> dict[str, np.ndarray]:
    """``map_batches`` function: one row of :func:`target_rule_stats` sums over the batch's block
    rows (``replay`` false or absent); replay rows are left out."""
    labels = np.asarray(batch["label"], dtype=np.int64)
    own = ~np.asarray(batch["replay"], dtype=bool) if "replay" in batch else np.ones(len(labels), dtype=bool)
    if own.any():
        probs, targets = _matrix(batch["teacher_probs"])[own], _matrix(batch["target"])[own]
        stats = target_rule_stats(probs, labels[own], targets, threshold, floor, temperature)
    else:
        stats = {k: 0.0 if k.endswith("_sum") else 0 for k in RULE_STAT_KEYS}
    return {k: np.asarray([v]) for k, v in stats.items()}


def teacher_block_stats(targets_ds, cfg: Config) -> dict[str, float] | None:
    """What the teacher and the target rule did on a generation's own block, from its stored
    targets (``score_block``'s output: ``label``, ``teacher_probs``, ``target``, ``replay``).

    Returns :func:`incr_ray.method.targets.finalize_rule_stats` of the block's rows: the
    teacher's accuracy and NLL (at τ = 1, like the holdout NLL, whatever ``method.temperature``
    the probabilities were stored at), kept/pushed/floored shares, mean target entropy and
    ``rows``; ``None`` when the block holds no rows.
    """
    m = cfg.method
    stats_ds = targets_ds.select_columns(
        [c for c in ("label", "teacher_probs", "target", "replay") if c in targets_ds.columns()]
    ).map_batches(block_rule_stats,
                  fn_kwargs={"threshold": m.threshold, "floor": m.floor, "temperature": m.temperature},
                  batch_format="numpy", batch_size=STATS_BATCH_SIZE)
    rows = stats_ds.take_all()  # one small row per batch
    if not rows:
        return None
    total = merge_rule_stats([{k: r[k] for k in RULE_STAT_KEYS} for r in rows])
    return finalize_rule_stats(total) if total["rows"] else None
