"""Teacher scoring: a model (or an ensemble of them) scores a block in a Ray Data actor pool.

:class:`TargetScorer` loads the teacher once per actor — with ``teacher.ensemble`` every member,
so a batch is tokenized once and scored by each — and turns each batch into the teacher's softmax
(the members' mean) and the soft target of every row; each batch's rows run sorted by length, in
forwards of at most ``teacher.forward_tokens`` padded tokens (:func:`incr_ray.modeling.classifier_logits`).
Resources — pool size, CPUs and GPUs per actor, batch size — are set at the ``map_batches`` call in
:func:`score_block`, never inside the class. When the actors hold GPUs, :func:`score_block` puts
tokenization in a CPU stage of its own (:func:`tokenize_batch`), so a GPU waits on no tokenizer.
:func:`teacher_block_stats` then reads back what the teacher and the target rule did on the block.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from typing import Any

import numpy as np
import pyarrow as pa

from .. import faults
from ..config import Config
from ..heads import output_layer_name
from ..method.herding import l2_normalised
from ..method.targets import (RULE_STAT_KEYS, ensemble_probs, finalize_rule_stats, merge_rule_stats, soft_targets,
                              softmax, target_rule_stats)
from ..modeling import classifier_logits, load_for_inference, load_tokenizer, token_ids
from ..storage import parquet_batches
from .resources import require_resolved
from .visibility import require_visible


class TargetScorer:
    """``map_batches`` class: adds ``teacher_probs`` and ``target`` to every row of a batch.

    ``model_path``: the teacher's model folder, or the folders of an ensemble's members
    (``teacher.ensemble``), all held by this actor: each scores the batch at the run's temperature
    and ``teacher_probs`` is the mean of their softmaxes
    (:func:`incr_ray.method.targets.ensemble_probs`). The members share the run's tokenizer (every
    generation's folder holds the base model's), so the batch is tokenized once, by the first.
    ``num_classes``: the classes the student learns, when an extension added some a member was
    never trained on: its probabilities are padded with zeros for them
    (:func:`incr_ray.method.targets.padded_probs`) before the mean and the target rule, and stored padded.
    ``features``: also add ``teacher_features`` to the replay candidates (rows whose ``replay`` is
    true; null on the others): the L2-normalised vector the head's output layer of the newest member
    (the teacher the student starts from) reads, from the same forward — what
    ``replay.selection: herding`` picks a memory on."""

    def __init__(self, model_path: str | list[str], cfg: Config | dict[str, Any], on_gpu: bool, progress=None,
                 fault_plan=None, num_classes: int | None = None, features: bool = False):
        faults.install(fault_plan)  # the test seam's faults, handed over by score_block (none in real runs)
        paths = [model_path] if isinstance(model_path, str) else list(model_path)
        for path in paths:
            require_visible({"storage.path (the teacher's model)": path}, "a scoring actor")
        cfg = as_config(cfg)
        self.members = [load_for_inference(path, cfg, on_gpu) for path in paths]
        self.model, self.tokenizer = self.members[0]
        self.max_length = cfg.model.max_length
        self.forward_tokens = cfg.teacher.tokens_per_forward(on_gpu)
        self.method = cfg.method
        self.num_classes = num_classes
        self.feature_layer = output_layer_name(self.members[-1][0]) if features else None
        self.batches = 0
        self.progress = progress  # a queue actor that counts the rows scored (ScoringProgress), or None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.batches += 1
        faults.kill_teacher_before_batch(self.batches)
        ids = batch.get(TOKEN_IDS)  # tokenized by score_block's CPU stage, or None: tokenized here
        batch = {k: v for k, v in batch.items() if k != TOKEN_IDS}
        texts = [str(t) for t in batch["text"]]
        if ids is None and len(self.members) > 1:  # once for every member
            ids = token_ids(self.tokenizer, texts, self.max_length) if texts else []
        member_probs, features = [], None
        for i, (model, tokenizer) in enumerate(self.members):
            layer = self.feature_layer if i == len(self.members) - 1 else None
            out = classifier_logits(model, tokenizer, texts, self.max_length, max_tokens=self.forward_tokens, ids=ids,
                                    feature_layer=layer)
            logits, features = out if layer else (out, features)
            member_probs.append(softmax(logits, self.method.temperature))
        probs = ensemble_probs(member_probs, self.num_classes)
        labels = np.asarray(batch["label"], dtype=np.int64)
        target = soft_targets(probs, labels, threshold=self.method.threshold, floor=self.method.floor)
        if self.progress is not None:
            # Fire and forget: the count never waits on the driver, nor fails the batch.
            self.progress.put_nowait.remote(len(labels))
        table = _with_list_columns(batch, teacher_probs=probs, target=target)
        if features is None:
            return table
        return table.append_column(FEATURES, _rows_where(l2_normalised(features), np.asarray(batch["replay"], bool)))


FEATURES = "teacher_features"  # the scorer's column of replay candidates' features (replay.selection herding)


def _rows_where(matrix: np.ndarray, where: np.ndarray) -> pa.Array:
    """A list<float32> column: the rows of ``matrix`` where ``where`` holds, null elsewhere (a block's
    own rows need no features, and a block may hold millions of them)."""
    values = pa.array(matrix[where].astype(np.float32).reshape(-1), pa.float32())
    offsets = np.concatenate([[0], np.cumsum(np.where(where, matrix.shape[1], 0))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=pa.array(~where))


def _with_list_columns(batch: dict[str, np.ndarray], **matrices: np.ndarray) -> pa.Table:
    """The batch plus (n, C) matrices as plain list<double> columns, so the targets Parquet reads
    in pandas/pyarrow/Spark without Ray's tensor extension type."""
    cols = {k: pa.array(v) for k, v in batch.items()}
    for name, m in matrices.items():
        flat = pa.array(m.reshape(-1), pa.float64())
        cols[name] = pa.FixedSizeListArray.from_arrays(flat, m.shape[1]).cast(pa.list_(pa.float64()))
    return pa.table(cols)


def as_config(cfg: Config | dict[str, Any]) -> Config:
    """A scorer's config: the pool passes the plain dict (``Config.to_dict``), a caller in-process
    may pass the Config itself."""
    return cfg if isinstance(cfg, Config) else Config.model_validate(cfg)


_restart_warning_absorbed = False


def absorb_restart_warning() -> None:
    """Keep Ray's false alarm about restarting scoring actors off the console (call it on the
    driver, with Ray started, before a pool's actors are made).

    Ray logs one ERROR line per process (``core_worker.cc: Actor with class name
    'MapWorker(MapBatches(TargetScorer))' ... has constructor arguments in the object store and
    max_restarts > 0``, ray-project/ray#53727) when it creates an actor that may restart and whose
    constructor takes an object from the object store: if that object were gone, the restart would
    fail. Every actor of a Ray Data pool does, whatever the class's own arguments: Ray Data
    ``ray.put``s the pool's map function and its DataContext and passes their refs (Ray 2.60,
    ``actor_pool_map_operator.py`` ``_start_actor``). It also holds both refs for the operator's
    life (``map_operator.py``, cached properties), so a restarted scoring actor does start (the R3
    scenario kills one mid-block and every row is still scored once).

    So the line is spent here, once per process: an actor that trips the same check is created
    with this process's stderr pointed at /dev/null for that call (the line stays in the driver's
    log file), and killed before it is placed (it asks for a resource no node has).
    """
    global _restart_warning_absorbed
    if _restart_warning_absorbed:
        return
    import ray

    @ray.remote(num_cpus=0, max_restarts=1, resources={"incr_ray_never_placed": 1})
    class _RestartWarning:
        def __init__(self, arg):
            pass

    arg = ray.put(None)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        actor = _RestartWarning.remote(arg)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor)
    _restart_warning_absorbed = True


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


TOKEN_IDS = "input_ids"  # the column the tokenizing stage adds and the scorer drops

# Blocks per scoring actor: the actors take blocks as they free up, so with several each the last
# wave idles for one block, not for a pool's share of the rows.
BLOCKS_PER_ACTOR = 4
# ... and no block over this many batches, so that outputs stream to the writer and a large block's
# idle tail stays short.
MAX_BATCHES_PER_BLOCK = 32


def scoring_block_rows(rows: int, blocks: int, batch_size: int, pool_size: int) -> int | None:
    """Rows per block to cut ``rows`` rows held in ``blocks`` blocks into before a pool of
    ``pool_size`` actors scores them in batches of ``batch_size``; None when the blocks serve as
    they are. Cut blocks hold whole batches: at most :data:`MAX_BATCHES_PER_BLOCK`, and with several
    actors at least :data:`BLOCKS_PER_ACTOR` blocks per actor where the rows allow."""
    batches = math.ceil(rows / batch_size)
    wanted = max(math.ceil(batches / MAX_BATCHES_PER_BLOCK), min(BLOCKS_PER_ACTOR * pool_size, batches) if pool_size > 1 else 1)
    if blocks >= wanted and rows <= blocks * batch_size * MAX_BATCHES_PER_BLOCK:
        return None
    return batch_size * max(1, batches // wanted)


@functools.lru_cache(maxsize=2)
def _stage_tokenizer(model_path: str, trust_remote_code: bool):
    """The teacher's tokenizer, loaded once per Ray worker process (tasks reuse their process)."""
    from ..storage import stage_local

    return load_tokenizer(stage_local(model_path), trust_remote_code)


def tokenize_batch(batch: pa.Table, model_path: str, max_length: int, trust_remote_code: bool = False) -> pa.Table:
    """``map_batches`` function (CPU tasks ahead of the scoring actors): the batch plus each row's
    token ids, truncated at ``max_length``, unpadded (``input_ids``, list<int32>)."""
    tok = _stage_tokenizer(model_path, trust_remote_code)
    ids = token_ids(tok, [str(t) for t in batch.column("text").to_pylist()], max_length)
    return batch.append_column(TOKEN_IDS, pa.array(ids, pa.list_(pa.int32())))


def _cpus_beside_pool(pool_cpus: float) -> float:
    """CPUs the cluster has beyond what the scoring pool holds (a tokenizing stage needs one)."""
    import ray

    return ray.cluster_resources().get("CPU", 0.0) - pool_cpus


def score_block(ds, model_path: str | list[str], cfg: Config, on_gpu: bool, progress=None,
                tokenize_stage: bool | None = None, num_classes: int | None = None, features: bool = False):
    """Teacher outputs for every row of ``ds`` (lazy): adds ``teacher_probs`` and ``target``.
    ``model_path``: the teacher's folder, or an ensemble's (each actor holds them all, see
    :class:`TargetScorer`). ``progress``: a queue actor each scoring actor tells how many rows it
    scored. ``num_classes``: the student's classes, when it has more than the teacher;
    ``features``: add the replay candidates' ``teacher_features`` too.

    The rows go to the actors in blocks cut by :func:`scoring_block_rows` where needed. ``tokenize_stage``: tokenize
    in CPU tasks ahead of the actors (default: when the actors hold GPUs; on CPU the pool holds the
    CPUs such a stage would need, and tokenizing is a few percent of a CPU forward).
    """
    require_resolved(cfg, "score_block")  # a run's config is, since open_run (incr_ray.resolve)
    paths = [model_path] if isinstance(model_path, str) else list(model_path)
    # Read before the actors start: a pool holding every CPU would starve its own read tasks.
    ds = ds.materialize()
    t = cfg.teacher
    rows_per_block = scoring_block_rows(ds.count(), ds.num_blocks(), t.batch_size, t.pool_size)
    if rows_per_block is not None:  # cut here too: the repartition's tasks need CPUs the pool will hold
        ds = ds.repartition(target_num_rows_per_block=rows_per_block).materialize()
    absorb_restart_warning()
    resources, actor_gpu = scoring_pool(cfg, on_gpu)
    if tokenize_stage is None:
        tokenize_stage = actor_gpu and _cpus_beside_pool(t.pool_size * float(t.cpus_per_actor)) >= 1
    if tokenize_stage:
        ds = ds.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=t.batch_size, num_cpus=1,
                            fn_kwargs={"model_path": paths[0], "max_length": cfg.model.max_length,
                                       "trust_remote_code": cfg.model.trust_remote_code})
    return ds.map_batches(
        TargetScorer,
        # Plain values (paths, dicts): what a restarted actor is built from again.
        fn_constructor_kwargs={"model_path": paths if len(paths) > 1 else paths[0], "cfg": cfg.to_dict(),
                               "on_gpu": actor_gpu, "progress": progress, "fault_plan": faults.current(),
                               "num_classes": num_classes, "features": features},
        batch_size=t.batch_size,
        **resources,
    )


# Rows per batch when summarising stored targets: numpy on a few floats per row, so the driver
# streams a block of any size in bounded memory.
STATS_BATCH_SIZE = 4096


def _matrix(column: pa.Array) -> np.ndarray:
    """The ``(n, C)`` float64 matrix of a list column whose rows all hold C values."""
    return np.asarray(column.flatten(), dtype=np.float64).reshape(len(column), -1)


def block_rule_stats(batch: pa.RecordBatch, threshold: float, floor: float | None,
                     temperature: float = 1.0) -> dict[str, float]:
    """:func:`target_rule_stats` sums over a batch's block rows (``replay`` false or absent);
    replay rows are left out."""
    labels = batch.column("label").to_numpy().astype(np.int64)
    own = (~batch.column("replay").to_numpy(zero_copy_only=False).astype(bool) if "replay" in batch.schema.names
           else np.ones(len(labels), dtype=bool))
    if not own.any():
        return {k: 0.0 if k.endswith("_sum") else 0 for k in RULE_STAT_KEYS}
    probs, targets = _matrix(batch.column("teacher_probs"))[own], _matrix(batch.column("target"))[own]
    return target_rule_stats(probs, labels[own], targets, threshold, floor, temperature)


def teacher_block_stats(targets_path: str, cfg: Config) -> dict[str, float] | None:
    """What the teacher and the target rule did on a generation's own block, from its stored
    targets (the Parquet ``score_block``'s output went to: ``label``, ``teacher_probs``,
    ``target``, ``replay``), streamed here on the driver: a Ray Data pass cost more to start
    than the numpy it runs.

    Returns :func:`incr_ray.method.targets.finalize_rule_stats` of the block's rows: the
    teacher's accuracy and NLL (at τ = 1, like the holdout NLL, whatever ``method.temperature``
    the probabilities were stored at), kept/pushed/floored shares, mean target entropy and
    ``rows``; ``None`` when the block holds no rows.
    """
    m = cfg.method
    batches = parquet_batches(targets_path, ["label", "teacher_probs", "target", "replay"], STATS_BATCH_SIZE)
    parts = [block_rule_stats(b, m.threshold, m.floor, m.temperature) for b in batches if b.num_rows]
    if not parts:
        return None
    total = merge_rule_stats(parts)
    return finalize_rule_stats(total) if total["rows"] else None
