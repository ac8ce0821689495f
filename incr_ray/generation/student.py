"""Student training on Ray Train: one generation, read top to bottom.

Two halves, kept apart: :func:`train_per_worker` runs on every Ray Train worker — set up, training
arguments, trainer, train, save, evaluate, report — and :func:`fit_student` is the driver side
(builds the ``TorchTrainer`` for a :class:`StudentRequest`, runs it, puts the model in
``gen_<g>/model``). The Hugging Face pieces they share with ``benchmarks/gpu_check.py`` live in
:mod:`incr_ray.generation.trainer`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchTrainer
from transformers import PrinterCallback, TrainerCallback, TrainerState, set_seed
from transformers.trainer_utils import get_last_checkpoint

from .. import faults
from ..config import Config, ConfigError
from ..lora import parameter_counts, with_lora
from ..method.hashing import generation_seed, shuffle_keys
from ..modeling import fold_temperature, load_classifier, load_tokenizer
from ..storage import remove_tree, stage_local, upload_dir
from .deepspeed_config import precision_problem, resolve_precision
from .evaluation import EXTENSION_HOLDOUT, evaluate_student, write_predictions
from .progress import MlflowStepLogger, ProgressCallback, ProgressRelay, TokenCount, queue_say
from .resources import require_resolved
from .trainer import (SoftTargetTrainer, generation_steps, loss_settings, make_collate, precision_record,
                      reporting_env, save_lora_student, save_student, training_arguments)

SHUFFLE_KEY = "_shuffle_key"
# Training blocks up to this many rows are put in order on the driver (see shuffled_for_training).
LOCAL_ORDER_ROWS = 200_000
LOCAL_ORDER_BLOCK = 4096


@dataclass(frozen=True)
class StudentRequest:
    """What the generation loop asks of one student training."""

    generation: int
    init_model: str  # the teacher's model folder, or the base model
    label_names: list[str]
    rows: int  # training rows, replay included: decides the number of steps
    model_dest: str  # gen_<g>/model on storage
    ray_storage: str  # Ray Train's folder for this run (in-generation checkpoints)
    predictions_dest: str | None = None  # gen_<g>/holdout_predictions.parquet: row id -> class
    lr_window: tuple[int, int, int] | None = None  # student.schedule: run — (offset, warmup, total)
    later_steps: int = 0  # planned steps of the generations after this one (the run's ETA)
    progress_dest: str | None = None  # gen_<g>/progress.json, written by rank 0
    # tracking.backend mlflow: the store and this generation's run, where rank 0 logs each step's
    # loss and learning rate; tensorboard: the generation's log folder.
    tracking_uri: str | None = None
    tracking_run_id: str | None = None
    adapter_dest: str | None = None  # gen_<g>/adapter on storage (student.lora.r > 0)


# ---------------------------------------------------------------------------------------------
# On each worker


class _ReportCheckpoint(TrainerCallback):
    """Hands each in-generation checkpoint to Ray Train without copying it.

    Ray Train's own callback copies the Hugging Face checkpoint folder before reporting it; at 7B
    that is ~100 GB of disk and minutes per save. Here the folder is moved (a rename) into the
    layout Ray Train restores (``<report>/checkpoint/``), reported, and deleted.
    """

    def __init__(self, work: str):
        self.work = work

    def on_save(self, args, state, control, **kwargs):
        saved = get_last_checkpoint(args.output_dir)
        report = os.path.join(self.work, "report", str(state.global_step))
        checkpoint = None
        if saved is not None:  # every rank writes its ZeRO shards; all must report, shards or not
            os.makedirs(report)
            os.rename(saved, os.path.join(report, RayTrainReportCallback.CHECKPOINT_NAME))
            checkpoint = ray.train.Checkpoint.from_directory(report)
        ray.train.report({"step": state.global_step}, checkpoint=checkpoint)
        shutil.rmtree(report, ignore_errors=True)  # uploaded by now (a synchronous report)


class _FaultCallback(TrainerCallback):
    """The test seam's worker faults (see :mod:`incr_ray.faults`); a no-op in real runs."""

    def __init__(self, generation: int, rank: int):
        self.generation, self.rank = generation, rank

    def on_step_end(self, args, state, control, **kwargs):
        faults.kill_worker_at_step(self.generation, state.global_step, self.rank)
        faults.raise_in_worker_at_step(self.generation, state.global_step, self.rank)


def _set_up(on_gpu: bool, cfg: Config) -> None:
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Imported here, after DS_ACCELERATOR is set: DeepSpeed picks its accelerator at import.
    import deepspeed

    # Workers print our progress lines; DeepSpeed's and Ray Train's INFO chatter would bury them.
    for name in ("DeepSpeed", "deepspeed", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # NCCL reads this when its communicator starts (the first collective, after this): a first run on
    # a new cluster then says why a collective hangs or fails instead of only that it did.
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    # Ray Train already made the torch process group; DeepSpeed's comm layer must wrap it before
    # ZeRO-3 partitions weights at load time, or it sees a world of one.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if not on_gpu:
        torch.set_num_threads(cfg.cluster.cpus_per_worker)


def _in_generation_checkpoint(work: str) -> tuple[str | None, int]:
    """(HF checkpoint folder, its step) when this worker group restarts after a failure."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, 0
    hf = os.path.join(ckpt.to_directory(os.path.join(work, "resume")), RayTrainReportCallback.CHECKPOINT_NAME)
    state = os.path.join(hf, "trainer_state.json")
    if not os.path.isfile(state):
        return None, 0
    return hf, int(TrainerState.load_from_json(state).global_step)


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


def train_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: one generation of student training."""
    entered, entered_at = time.perf_counter(), time.time()
    cfg = Config.model_validate(loop_config["config"])
    request = StudentRequest(**loop_config["request"])
    on_gpu, max_steps, g = loop_config["on_gpu"], loop_config["max_steps"], request.generation
    faults.install(loop_config["faults"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    work = tempfile.mkdtemp(prefix=f"incr-ray-g{g}-r{rank}-")
    try:
        # Set up.
        _set_up(on_gpu, cfg)
        bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
        precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_ok)
        problem = precision_problem(precision, cfg.deepspeed.stage, on_gpu, bf16_ok)  # the driver could not ask a GPU
        if problem:
            raise ConfigError(problem)

        # Training arguments — before the model loads, so that ZeRO-3 partitions it while it loads.
        os.environ.update(reporting_env(cfg, request.tracking_uri))  # read by HF's TensorBoard / W&B callbacks
        args = training_arguments(cfg, g, max_steps, os.path.join(work, "hf"), on_gpu, precision)
        # Seeded before the model loads: a new classification head is initialised at load, before
        # the Trainer would seed anything, and it must come from run.seed too.
        set_seed(args.seed)
        init_path = stage_local(request.init_model)
        tokenizer = load_tokenizer(init_path, cfg.model.trust_remote_code)
        # fp32 weights whatever the checkpoint holds: DeepSpeed makes the 16-bit copy itself, and a
        # bf16 checkpoint loaded as it is (transformers' dtype="auto") would train without fp32 masters.
        def load_initial(**kwargs):
            return load_classifier(init_path, request.label_names, cfg.model.trust_remote_code, tokenizer=tokenizer,
                                   dtype=torch.float32, **kwargs)

        model, new_keys = load_initial(with_new_keys=True)
        lora = cfg.student.lora
        if lora.r:  # adapters on the initial model; the head and weights new at load train in full
            model = with_lora(model, lora, new_keys)
        trainable_params, total_params = parameter_counts(model)

        # Trainer.
        collate = TokenCount(make_collate(tokenizer, len(request.label_names), cfg.model.max_length))
        trainer = SoftTargetTrainer(
            model=model,
            args=args,
            train_dataset=ray.train.get_dataset_shard("train").iter_torch_batches(
                batch_size=cfg.student.batch_size, collate_fn=collate,
            ),
            processing_class=tokenizer,
            lr_window=request.lr_window,
            **loss_settings(cfg, g),
        )
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressCallback(
            g, max_steps, loop_config["progress"], rows_per_step=cfg.student.batch_size * cfg.student.grad_accum * world,
            workers=world, later_steps=request.later_steps, tokens=collate,
            dest=request.progress_dest if rank == 0 else None))
        if cfg.tracking.backend == "mlflow" and request.tracking_run_id:
            trainer.add_callback(MlflowStepLogger(request.tracking_uri, request.tracking_run_id, g,
                                                  queue_say(loop_config["progress"])))
        trainer.add_callback(_FaultCallback(g, rank))
        if cfg.student.checkpoint_every_steps:
            trainer.add_callback(_ReportCheckpoint(work))
        trainer = prepare_trainer(trainer)

        # Train.
        resume_from, resumed_step = _in_generation_checkpoint(work)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume_from)
        train_seconds = time.perf_counter() - started

        # Save (every rank: ZeRO-3 gathers the weights).
        saving = time.perf_counter()
        out_dir = os.path.join(work, "model")
        meta = {"generation": g, "label_names": request.label_names, "config": loop_config["config"]}
        if lora.r:  # the adapter, then the initial model with it merged in: a plain model folder
            save_lora_student(trainer, tokenizer, out_dir, os.path.join(work, "adapter"), meta, rank == 0,
                              load_initial, base_model=request.init_model)
        else:
            save_student(trainer, tokenizer, out_dir, meta, is_rank0=rank == 0)

        # Evaluate the model still in memory, saving the actor pool a separate evaluation would
        # cost: every rank reads each whole slice (holdout, validation, retention) and scores its
        # share of each batch.
        evaluating = time.perf_counter()
        evaluation: dict[str, Any] = {}
        if loop_config["evaluate"]:
            slices = {name: ray.train.get_dataset_shard(name).iter_batches(batch_size=cfg.eval.batch_size,
                                                                          batch_format="numpy")
                      for name in loop_config["evaluate"]}
            evaluation = evaluate_student(trainer.model, tokenizer, slices, cfg, args.device, rank, world)
            if rank == 0:
                predictions = evaluation.pop("predictions")
                if request.predictions_dest:
                    write_predictions(request.predictions_dest, *predictions)
                if "calibration" in evaluation:  # the saved folder gives the calibrated probabilities
                    fold_temperature(out_dir, evaluation["calibration"]["temperature"])
            evaluation.pop("predictions", None)
        eval_seconds = time.perf_counter() - evaluating

        # Report: which nodes the group spanned (placement is visible to users and tests), timings.
        nodes = [None] * world
        dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        metrics = {
            "train_loss": float(output.training_loss),
            "resumed_from_step": resumed_step,
            "workers": world,
            "nodes": len(set(nodes)),
            "train_seconds": train_seconds,
            # Where a generation's fixed cost goes: imports, model load and DeepSpeed set-up before
            # the first step, and the consolidated save after the last.
            "setup_seconds": started - entered,
            "steps": int(output.global_step),
            # The highest rate a logged step trained at: the peak, or the floor of `schedule: run` after its plan.
            "max_learning_rate": max((h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h),
                                     default=None),
            "samples_per_second": max_steps * cfg.student.batch_size * cfg.student.grad_accum * world / train_seconds,
            "zero_stage": cfg.deepspeed.stage,
            "cpus_per_worker": cfg.cluster.cpus_per_worker,  # the number `auto` became
            "trainable_params": trainable_params,  # adapters + head under LoRA; every weight otherwise
            "total_params": total_params,
            "precision": precision_record(trainer, precision, args.hf_deepspeed_config.config),
            **evaluation,  # holdout, and validation / calibration / retention when measured
            "eval_seconds": eval_seconds,
        }
        # Rank 0 writes the model straight to gen_<g>/model (local, NFS or s3://), not through the
        # driver. Ray Train keeps reported metrics only with a checkpoint: a one-line one.
        checkpoint = None
        if rank == 0:
            if request.adapter_dest:  # before the model: a recorded model always has its adapter
                upload_dir(os.path.join(work, "adapter"), request.adapter_dest)
            upload_dir(out_dir, request.model_dest)
            marker = os.path.join(work, "reported-model")
            os.makedirs(marker)
            with open(os.path.join(marker, "model.json"), "w") as f:
                json.dump({"model": request.model_dest}, f)
            checkpoint = ray.train.Checkpoint.from_directory(marker)
        metrics["save_seconds"] = time.perf_counter() - saving - eval_seconds  # local save + upload
        # Wall clock (this node's) when the function began and when it reports its last: the
        # driver's fit time outside the two is Ray Train's start-up and shutdown.
        metrics.update(entered_at=entered_at, reported_at=time.time())
        ray.train.report(metrics, checkpoint=checkpoint)
    except Exception as err:
        # Ray Train shows the driver this exception's traceback, notes included.
        tail = _own_output_tail()
        if tail:
            err.add_note(f"last lines worker rank {rank} printed:\n{tail}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the reported model has been persisted by now


# ---------------------------------------------------------------------------------------------
# On the driver


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
    # Blocks of a few thousand rows: several workers' streaming_split shares them out evenly.
    return ray.data.from_arrow([table.slice(i, LOCAL_ORDER_BLOCK) for i in range(0, table.num_rows, LOCAL_ORDER_BLOCK)])


def fit_student(cfg: Config, request: StudentRequest, train_ds, on_gpu: bool, holdout_ds=None,
                say=print, validation_ds=None, retention_ds=None,
                extension_holdouts: dict[int, Any] | None = None) -> dict[str, Any]:
    """Train ``request.generation`` on ``train_ds`` and put the model at ``request.model_dest``.

    Returns the workers' metrics; with ``holdout_ds`` the workers also evaluate the trained model
    on it (``holdout``), on ``validation_ds`` (``validation``, and ``calibration`` with
    ``method.calibrate``), on ``retention_ds`` (``retention``) and on each extension's own
    holdout in ``extension_holdouts`` (``drift``) — see
    :func:`incr_ray.generation.evaluation.evaluate_student`."""
    require_resolved(cfg, "fit_student")  # a run's config is, since open_run (incr_ray.resolve)
    s = cfg.student
    # Ray Train's controller polls the workers every 2 s by default, so a finished generation sat
    # idle for up to 2 s before shutdown. Read by TorchTrainer.fit(); a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Materialize first: training workers may hold every CPU of the cluster, and a lazy dataset
    # would then wait forever for a CPU to run its read tasks on.
    seed = generation_seed(cfg.run.seed, request.generation)
    datasets = {"train": shuffled_for_training(train_ds, seed, rows=request.rows)}
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
    started, started_at = time.perf_counter(), time.time()
    with ProgressRelay(say) as relay:
        trainer = TorchTrainer(
            train_per_worker,
            train_loop_config={"config": cfg.to_dict(), "request": asdict(request), "max_steps": max_steps,
                               "on_gpu": on_gpu, "evaluate": [n for n in datasets if n != "train"],
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
            dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker reads each whole slice
        )
        result = trainer.fit()
    fit_seconds, ended_at = time.perf_counter() - started, time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"generation {request.generation}: training finished without reporting its model")
    remove_tree(f"{request.ray_storage}/{name}")  # in-generation checkpoints; the model is in gen_<g>/model
    metrics = dict(result.metrics or {})
    metrics["rows"] = request.rows
    metrics["max_steps"] = max_steps
    metrics["fit_seconds"] = fit_seconds  # driver wall time of TorchTrainer.fit, start-up included
    # From fit() to the worker function's first line (controller, placement, worker processes and
    # their imports, the process group), and from its last report to fit()'s return.
    metrics["fit_startup_seconds"] = metrics.pop("entered_at") - started_at
    metrics["fit_shutdown_seconds"] = ended_at - metrics.pop("reported_at")
    return metrics
