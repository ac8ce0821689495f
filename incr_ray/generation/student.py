"""Student training on Ray Train: the Ray glue around the Ray-free student recipe.

Two halves, kept apart: :func:`train_per_worker` runs on every Ray Train worker — the context, the
shard, the in-generation checkpoint, then :func:`incr_ray.generation.recipe.run_student` (set up,
trainer, train, save, evaluate), then the upload and the report — and :func:`fit_student` is the
driver side (builds the ``TorchTrainer`` for a :class:`StudentRequest`, runs it, puts the model in
``gen_<g>/model``).

A worker's scratch on its node (its folder, a resumed checkpoint's copy, the sweep of what dead
workers left) is :mod:`incr_ray.generation.scratch`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch.distributed as dist
from ray.train import CheckpointConfig, CheckpointUploadMode, FailureConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback
from ray.train.torch import TorchTrainer
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from .. import faults
from ..config import Config
from ..method.hashing import generation_seed, shuffle_keys
from ..storage import drop_copy, remove_tree, upload_dir, write_bytes_atomic
from .checkpoints import CheckpointCadence, checkpointing, folder_figures
from .evaluation import EXTENSION_HOLDOUT
from .progress import ProgressRelay
from .recipe import ADAPTER, FISHER, MODEL, StudentRequest, run_student
from .shards import BALANCED, TRAIN, RankShards, RankStream, StreamThen, cut_for_ranks
from .scratch import checkpoint_on_node, record_owner, sweep_stale_scratch, worker_folder
from .resources import require_resolved
from .trainer import generation_steps
from .visibility import require_visible

__all__ = ["StudentRequest", "fit_student", "shuffled_for_training", "train_per_worker"]

SHUFFLE_KEY = "_shuffle_key"
# Training blocks up to this many rows are put in order on the driver (see shuffled_for_training).
LOCAL_ORDER_ROWS = 200_000
LOCAL_ORDER_BLOCK = 4096


# ---------------------------------------------------------------------------------------------
# On each worker


class _ReportCheckpoint(TrainerCallback):
    """Hands each in-generation checkpoint to Ray Train without copying it, and trains on while it
    uploads.

    Ray Train's own callback copies the Hugging Face checkpoint folder before reporting it; at 7B
    that is ~90 GB of disk and minutes per save. Here the folder is moved (a rename) into the
    layout Ray Train restores (``<report>/checkpoint/``) and reported with
    ``checkpoint_upload_mode=ASYNC``: Ray Train uploads it from a thread of this worker and deletes
    it once uploaded (``delete_local_checkpoint_after_upload``), and reports reach the controller
    in order, so the generation's last (synchronous) report waits for the upload. Before the next
    save writes, this rank waits for the previous folder to be gone: one checkpoint on its disk.
    """

    WAIT_S = 3600.0  # Ray Train logs, and does not raise, a failed delete: do not wait for ever

    def __init__(self, work: str):
        self.work = work
        self.pending: str | None = None  # the last reported folder, until Ray Train deletes it
        self.saves, self.seconds, self.bytes, self.model_file = 0, 0.0, 0, False
        self.began = 0.0

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:  # set by CheckpointCadence, added before this callback
            self.began = time.perf_counter()
            while self.pending and os.path.exists(self.pending) and time.perf_counter() - self.began < self.WAIT_S:
                time.sleep(0.2)

    def on_save(self, args, state, control, **kwargs):
        saved = get_last_checkpoint(args.output_dir)
        checkpoint = None
        if saved is not None:  # every rank writes its ZeRO shards; all must report, shards or not
            self.bytes, self.model_file = folder_figures(saved)
            report = os.path.join(self.work, "report", str(state.global_step))
            os.makedirs(report)
            os.rename(saved, os.path.join(report, RayTrainReportCallback.CHECKPOINT_NAME))
            checkpoint, self.pending = ray.train.Checkpoint.from_directory(report), report
        ray.train.report({"step": state.global_step}, checkpoint=checkpoint,
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC, delete_local_checkpoint_after_upload=True)
        self.saves += 1
        self.seconds += time.perf_counter() - self.began

    def figures(self) -> dict[str, Any]:
        """For run.json (rank 0's): this try's saves, the training time they took (the wait for the
        previous upload included; the upload itself runs beside training), the last one's bytes on
        this rank, and whether it held a model weights file (it should not: DeepSpeed's states only)."""
        return {"checkpoint_saves": self.saves, "checkpoint_seconds": self.seconds,
                "checkpoint_rank_bytes": self.bytes, "checkpoint_model_file": self.model_file}


class _FaultCallback(TrainerCallback):
    """The test seam's worker faults and trained rows (see :mod:`incr_ray.faults`); a no-op in real runs."""

    def __init__(self, generation: int, rank: int, trained_rows: faults.TrainedRows | None = None):
        self.generation, self.rank, self.trained_rows = generation, rank, trained_rows

    def on_step_end(self, args, state, control, **kwargs):
        if self.trained_rows is not None:  # before a fault ends this process: the step was trained
            self.trained_rows.step_end(state.global_step)
        faults.kill_worker_at_step(self.generation, state.global_step, self.rank)
        faults.raise_in_worker_at_step(self.generation, state.global_step, self.rank)


def _in_generation_checkpoint() -> tuple[str | None, Path | None]:
    """(the Hugging Face checkpoint folder to continue from when this worker group restarts after a
    failure, or None on a first start; the node's copy it lies in, or None)."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, None
    folder, copy = checkpoint_on_node(ckpt.path, ckpt.filesystem)
    hf = os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME)
    return (hf if os.path.isfile(os.path.join(hf, "trainer_state.json")) else None), copy


def _own_output_tail(lines: int = 30) -> str:
    """The last lines this process wrote to stdout and stderr, which Ray sends to log files the job's
    console never shows (DeepSpeed's and NCCL's own messages among them). Linux only."""
    tails, seen = [], set()
    for fd in (1, 2):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if os.path.isfile(path) and path not in seen:
                seen.add(path)
                with open(path, errors="replace") as f:
                    tails.append("".join(f.readlines()[-lines:]).rstrip())
        except OSError:
            continue
    return "\n".join(t for t in tails if t)


def _model_to_storage(work: str, request: StudentRequest) -> ray.train.Checkpoint:
    """Rank 0: the recipe's model (and adapter) straight to ``gen_<g>/`` (local, NFS or s3://), not
    through the driver, and the checkpoint to report with the metrics, which Ray Train keeps only
    with one: a one-line file naming the model."""
    if request.adapter_dest:  # before the model: a recorded model always has its adapter
        upload_dir(os.path.join(work, ADAPTER), request.adapter_dest)
    if request.fisher_dest:  # method.ewc: the model's Fisher, which the next student's penalty reads
        with open(os.path.join(work, FISHER), "rb") as f:
            write_bytes_atomic(request.fisher_dest, f.read())
    upload_dir(os.path.join(work, MODEL), request.model_dest)
    marker = os.path.join(work, "reported-model")
    os.makedirs(marker)
    with open(os.path.join(marker, "model.json"), "w") as f:
        json.dump({"model": request.model_dest}, f)
    return ray.train.Checkpoint.from_directory(marker)


def _tell_driver(progress, rank: int, marker: tuple[str, str]) -> None:
    """Rank 0 puts ``marker`` on the progress queue: the driver notes when it arrives (_FitClock)."""
    if rank == 0 and progress is not None:
        try:
            progress.put_nowait(marker)
        except Exception:  # noqa: BLE001 - timings must never fail training
            pass


def train_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: the recipe on this worker's shard, then rank 0 puts the model
    in storage, and every rank reports the metrics to Ray Train."""
    entered = time.perf_counter()
    cfg = Config.model_validate(loop_config["config"])
    request = StudentRequest(**loop_config["request"])
    faults.install(loop_config["faults"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _tell_driver(loop_config["progress"], rank, _FitClock.ENTERED)
    run_dir = os.path.dirname(request.run_manifest or "")
    init_setting = "storage.path" if run_dir and request.init_model.startswith(run_dir) else "model.base"
    require_visible({"storage.path": request.run_manifest, init_setting: request.init_model},
                    f"training worker rank {rank}")
    sweep_stale_scratch()
    work = worker_folder(request.generation, rank)
    try:
        for name in ("ray.train", "ray.data"):  # their INFO chatter would bury rank 0's progress lines
            logging.getLogger(name).setLevel(logging.WARNING)
        shard = ray.train.get_dataset_shard(TRAIN)  # this rank's run of the rows (shards.RankShards)
        balanced = ray.train.get_dataset_shard(BALANCED) if request.balanced_steps else None
        seam = faults.trained_rows(request.generation, rank, cfg.student.grad_accum)

        def train_batches(collate):  # max_steps × grad_accum batches, pass after pass (shards.RankStream)
            collate = seam.collate(collate) if seam else collate

            def stream_of(rows, steps: int) -> RankStream:
                return RankStream(lambda: rows.iter_torch_batches(batch_size=cfg.student.batch_size,
                                                                  collate_fn=collate),
                                  total=steps * cfg.student.grad_accum)

            stream = stream_of(shard, loop_config["max_steps"])
            if balanced is not None:  # balanced fine-tuning's batches after the main training's
                stream = StreamThen(stream, stream_of(balanced, request.balanced_steps))
            return seam.batches(stream) if seam else stream

        slices = {name: ray.train.get_dataset_shard(name).iter_batches(batch_size=cfg.eval.batch_size,
                                                                      batch_format="numpy")
                  for name in loop_config["evaluate"]}  # every worker reads each whole slice
        callbacks = [_FaultCallback(request.generation, rank, seam)]
        reporter = None
        if checkpointing(cfg.student.checkpoint_every_steps, cfg.student.checkpoint_every_minutes):
            reporter = _ReportCheckpoint(work)  # after the cadence: it reads the decision
            callbacks += [CheckpointCadence(cfg.student.checkpoint_every_steps, cfg.student.checkpoint_every_minutes),
                          reporter]
        resume_from, resume_copy = _in_generation_checkpoint()
        before_recipe = time.perf_counter() - entered
        metrics = run_student(
            cfg, request, train_batches, slices, rank=rank, world=world, work=work, on_gpu=loop_config["on_gpu"],
            max_steps=loop_config["max_steps"], progress=loop_config["progress"], resume_from=resume_from,
            callbacks=callbacks)
        metrics["setup_seconds"] += before_recipe  # the checkpoint's download among it
        if reporter is not None:
            metrics.update(reporter.figures())
        # Which nodes the group spanned: placement is visible to users and tests.
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        metrics["nodes"] = len(set(nodes))
        if resume_copy is not None and ctx.get_local_rank() == 0:  # every rank is past its resume by now
            drop_copy(resume_copy)
        uploading = time.perf_counter()
        checkpoint = _model_to_storage(work, request) if rank == 0 else None
        metrics["save_seconds"] += time.perf_counter() - uploading  # the local save + the upload
        _tell_driver(loop_config["progress"], rank, _FitClock.REPORTING)
        ray.train.report(metrics, checkpoint=checkpoint)
    except Exception as err:
        # Ray Train shows the driver this exception's traceback, notes included.
        tail = _own_output_tail()
        if tail:
            err.add_note(f"last lines worker rank {rank} printed:\n{tail}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the reported model has been persisted by now
        sweep_stale_scratch()  # e.g. the ranks Ray killed when an earlier try of this group failed


# ---------------------------------------------------------------------------------------------
# On the driver


class _FitClock(ProgressRelay):
    """The progress relay that also notes, on the driver's clock, when rank 0's worker function
    began and when it reported its last, from markers rank 0 puts on the queue: Ray Train's
    start-up and shutdown are the fit's time outside the two. (A worker's own clock is another
    node's: subtracting the driver's time from it measured the clocks' offset too.)"""

    ENTERED, REPORTING = ("incr-ray fit", "entered"), ("incr-ray fit", "reporting")  # not lines: never said

    def __init__(self, say):
        super().__init__(say)
        self.entered: float | None = None  # perf_counter on the driver; after a restart, the last try's
        self.reporting: float | None = None

    def handle(self, item) -> None:
        if item == self.ENTERED:
            self.entered, self.reporting = time.perf_counter(), None
        elif item == self.REPORTING:
            self.reporting = time.perf_counter()
        else:
            super().handle(item)


def shuffled_for_training(train_ds, seed: int, rows: int | None = None, local_rows: int = LOCAL_ORDER_ROWS):
    """The rows in a seeded random order that depends on the rows and the seed only, materialized.

    Sources are often sorted (by class, by date), and a block keeps its source's order: the
    Rotten Tomatoes file starts with all 1,097 plot summaries. Fine-tuning on long runs of one
    class wrecks the model, so every generation trains on its rows shuffled.

    The order is a sort by a per-row-id hash (:func:`incr_ray.method.hashing.shuffle_keys`), not
    Ray Data's ``random_shuffle``: that one seeds each input block by its position, so the same
    rows arriving from the teacher pool in another block order were trained in another order, and
    a resumed run ended with a different model than an uninterrupted one.

    Up to ``local_rows`` rows (``rows``, when the caller knows the count) are read once and sorted
    here in memory; more go through Ray Data's distributed sort, which streams but pays a sampling
    pass over the data and a shuffle — seconds per generation on a small block. Both orders are
    the same: by key, then row id.
    """

    def keyed(batch: pa.Table) -> pa.Table:
        keys = shuffle_keys(batch.column("row_id").to_numpy(), seed)
        return batch.append_column(SHUFFLE_KEY, pa.array(keys, type=pa.int64()))

    order = [SHUFFLE_KEY, "row_id"]
    keyed_ds = train_ds.map_batches(keyed, batch_format="pyarrow")
    if rows is None or rows > local_rows:
        # The key column stays: a map after the sort (drop_columns) may emit blocks out of order,
        # and the collate reads only the columns it needs.
        return keyed_ds.sort(order).materialize()
    tables = [t for t in ray.get(keyed_ds.to_arrow_refs()) if t.num_rows]
    if not tables:
        return keyed_ds.materialize()
    table = pa.concat_tables(tables, promote_options="default")
    table = table.take(pc.sort_indices(table, sort_keys=[(key, "ascending") for key in order]))
    # Blocks of a few thousand rows: cut_for_ranks then splits only the blocks where two ranks' rows meet.
    return ray.data.from_arrow([table.slice(i, LOCAL_ORDER_BLOCK) for i in range(0, table.num_rows, LOCAL_ORDER_BLOCK)])


def fit_student(cfg: Config, request: StudentRequest, train_ds, on_gpu: bool, holdout_ds=None,
                say=print, validation_ds=None, retention_ds=None,
                extension_holdouts: dict[int, Any] | None = None, balanced_ds=None) -> dict[str, Any]:
    """Train ``request.generation`` on ``train_ds`` and put the model at ``request.model_dest``.

    Returns the workers' metrics; with ``holdout_ds`` the workers also evaluate the trained model
    on it (``holdout``), on ``validation_ds`` (``validation``, and ``calibration`` with
    ``method.calibrate``), on ``retention_ds`` (``retention``) and on each extension's own
    holdout in ``extension_holdouts`` (``drift``) — see
    :func:`incr_ray.generation.evaluation.evaluate_student`. ``balanced_ds``: balanced fine-tuning's
    rows (``request.balanced_steps`` > 0), trained after the main steps in the same fit, in their
    own seeded order and split over the ranks as the training rows are."""
    require_resolved(cfg, "fit_student")  # a run's config is, since open_run (incr_ray.resolve)
    s = cfg.student
    # Ray Train's controller polls the workers every 2 s by default, so a finished generation sat
    # idle for up to 2 s before shutdown. Read by TorchTrainer.fit(); a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Materialize first: training workers may hold every CPU of the cluster, and a lazy dataset
    # would then wait forever for a CPU to run its read tasks on.
    seed = generation_seed(cfg.run.seed, request.generation)
    # Each rank's rows and batches depend on the rows, the seed and the number of workers only
    # (incr_ray.generation.shards); the last rows % workers rows of the order are left out.
    train, rows_left_out = cut_for_ranks(shuffled_for_training(train_ds, seed, rows=request.rows), cfg.cluster.workers)
    datasets = {TRAIN: train}
    if request.balanced_steps:
        datasets[BALANCED] = cut_for_ranks(shuffled_for_training(balanced_ds, seed, rows=request.balanced_rows),
                                           cfg.cluster.workers)[0]
    if holdout_ds is not None:
        datasets["holdout"] = holdout_ds.materialize()
        extra = [(f"{EXTENSION_HOLDOUT}{j:03d}", ds) for j, ds in sorted((extension_holdouts or {}).items())]
        for name, ds in (("validation", validation_ds), ("retention", retention_ds), *extra):
            if ds is not None:
                ds = ds.materialize()
                if ds.count():
                    datasets[name] = ds
    max_steps = generation_steps(cfg, request.rows)
    name = f"gen_{request.generation:03d}-{int(time.time())}"
    started = time.perf_counter()
    with _FitClock(say) as relay:
        trainer = TorchTrainer(
            train_per_worker,
            train_loop_config={"config": cfg.to_dict(), "request": asdict(request), "max_steps": max_steps,
                               "on_gpu": on_gpu, "evaluate": [n for n in datasets if n not in (TRAIN, BALANCED)],
                               "progress": relay.queue, "faults": faults.current()},
            scaling_config=ScalingConfig(
                num_workers=cfg.cluster.workers,
                use_gpu=on_gpu,
                resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if on_gpu else {})},
            ),
            run_config=RunConfig(
                name=name,
                storage_path=request.ray_storage,
                failure_config=FailureConfig(max_failures=s.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
            ),
            datasets=datasets,
            dataset_config=RankShards(TRAIN, BALANCED),  # every worker reads each whole evaluation slice
        )
        result = trainer.fit()
        ended = time.perf_counter()
    if result.checkpoint is None:
        raise RuntimeError(f"generation {request.generation}: training finished without reporting its model")
    remove_tree(f"{request.ray_storage}/{name}")  # in-generation checkpoints; the model is in gen_<g>/model
    metrics = dict(result.metrics or {})
    metrics["rows"] = request.rows
    metrics["rows_left_out"] = rows_left_out  # rows % workers: every rank trains as many rows
    metrics["max_steps"] = max_steps
    metrics["fit_seconds"] = ended - started  # driver wall time of TorchTrainer.fit, start-up included
    # From fit() to the worker function's first line (controller, placement, worker processes and
    # their imports), and from its last report to fit()'s return; both ends on the driver's clock
    # (the relay has handled every marker once its block has exited).
    if relay.entered is not None:
        metrics["fit_startup_seconds"] = relay.entered - started
    if relay.reporting is not None:  # a marker handled a moment after fit() returned: 0, not negative
        metrics["fit_shutdown_seconds"] = max(0.0, ended - relay.reporting)
    return metrics
