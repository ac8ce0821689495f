"""The student recipe: one generation of student training on one rank, free of Ray.

It reads top to bottom like a torchtune recipe — :func:`set_up` (DeepSpeed over the existing
process group, the precision checks, the training arguments, the seeded model, LoRA),
:func:`make_trainer`, :func:`train`, :func:`save`, :func:`evaluate`, :func:`consolidate` (the EWC
Fisher, ``method.ewc``) — and :func:`run_student` runs the steps in that order and returns the
metrics. Its inputs are plain: the config, the :class:`StudentRequest`, this rank's training
batches, the evaluation slices, rank and world.

Every rank of a ``torch.distributed`` group runs it: on Ray Train the group's workers, through the
glue in :func:`incr_ray.generation.student.train_per_worker` (the shard, the in-generation
checkpoint, the upload, the report); without Ray the GPU check and the multi-rank tests, in a group
:func:`incr_ray.generation.local_group.start_local_group` makes.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from transformers import PrinterCallback, TrainerCallback, TrainerState, TrainingArguments, set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from ..config import Config, ConfigError
from ..lora import parameter_counts, with_lora
from ..modeling import fold_temperature, load_classifier, load_for_inference, load_saved_tensors, load_tokenizer
from ..storage import stage_local
from .callbacks import MlflowStepLogger, ProgressCallback, StepClock, TokenCount, queue_say
from .deepspeed_config import precision_problem, resolve_precision
from .evaluation import Share, evaluate_student, write_predictions
from .fisher import FISHER_FILE, EwcAnchor, estimate_fisher, with_row_ids
from .trainer import (BatchStream, SoftTargetTrainer, loss_settings, make_collate, precision_record,
                      reporting_env, save_lora_student, save_student, training_arguments)

# What the recipe writes in its work folder, for the caller to upload (rank 0's copy is complete).
MODEL = "model"  # the model folder transformers.pipeline loads (LoRA: the merged model)
ADAPTER = "adapter"  # student.lora.r > 0: the trained adapter
FISHER = FISHER_FILE  # method.ewc > 0: the model's diagonal Fisher information and its weights

Batch = dict[str, np.ndarray]


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
    run_manifest: str | None = None  # the run's run.json: on a local storage.path, every worker must see it
    # method.ewc > 0: where gen_<g>/fisher.safetensors goes (written by rank 0 after the evaluation),
    # and the teacher's, whose penalty this student's loss adds (None: no teacher, or it has none).
    fisher_dest: str | None = None
    ewc_anchor: str | None = None
    # student.balanced_epochs > 0: balanced fine-tuning's rows (its dataset beside the training rows'),
    # their cap per class, and its optimizer steps, trained after the main max_steps in the same train().
    balanced_rows: int = 0
    balanced_per_class: int = 0
    balanced_steps: int = 0


@dataclass
class Student:
    """What set-up made: the student before training, and what trains it."""

    args: TrainingArguments
    precision: str  # fp32, bf16 or fp16, resolved on this rank's device
    tokenizer: Any
    model: torch.nn.Module  # wrapped by peft under LoRA
    load_initial: Callable[..., Any]  # loads the initial model again (whole, fp32): the LoRA merge
    trainable_params: int  # adapters + head under LoRA; every weight otherwise
    total_params: int


# ---------------------------------------------------------------------------------------------
# The steps


def set_up(cfg: Config, request: StudentRequest, work: str, on_gpu: bool, max_steps: int) -> Student:
    """DeepSpeed over the process group, the precision, the training arguments, then the model."""
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Imported here, after DS_ACCELERATOR is set: DeepSpeed picks its accelerator at import.
    import deepspeed

    # Rank 0 says our progress lines; DeepSpeed's INFO chatter would bury them.
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # NCCL reads this when its communicator starts (the first collective, after this): a first run on
    # a new cluster then says why a collective hangs or fails instead of only that it did.
    os.environ.setdefault("NCCL_DEBUG", "WARN")
    # The torch process group exists already (Ray Train's, or a local one); DeepSpeed's comm layer
    # must wrap it before ZeRO-3 partitions weights at load time, or it sees a world of one.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if not on_gpu:
        torch.set_num_threads(cfg.cluster.cpus_per_worker)

    bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_ok)
    problem = precision_problem(precision, cfg.deepspeed.stage, on_gpu, bf16_ok)  # the driver could not ask a GPU
    if problem:
        raise ConfigError(problem)

    # Training arguments before the model loads, so that ZeRO-3 partitions it while it loads.
    os.environ.update(reporting_env(cfg, request.tracking_uri))  # read by HF's TensorBoard / W&B callbacks
    args = training_arguments(cfg, request.generation, max_steps + request.balanced_steps, os.path.join(work, "hf"),
                              on_gpu, precision, main_steps=max_steps)
    # Seeded before the model loads: a new classification head is initialised at load, before the
    # Trainer would seed anything, and it must come from run.seed too.
    set_seed(args.seed)
    init_path = stage_local(request.init_model)
    tokenizer = load_tokenizer(init_path, cfg.model.trust_remote_code)

    # fp32 weights whatever the checkpoint holds: DeepSpeed makes the 16-bit copy itself, and a
    # bf16 checkpoint loaded as it is (transformers' dtype="auto") would train without fp32 masters.
    def load_initial(**kwargs):
        return load_classifier(init_path, request.label_names, cfg.model.trust_remote_code, tokenizer=tokenizer,
                               dtype=torch.float32, **kwargs)

    model, new_keys = load_initial(with_new_keys=True)
    if cfg.student.lora.r:  # adapters on the initial model; the head and weights new at load train in full
        model = with_lora(model, cfg.student.lora, new_keys)
    return Student(args, precision, tokenizer, model, load_initial, *parameter_counts(model))


def make_trainer(cfg: Config, request: StudentRequest, student: Student,
                 train_batches: Callable[[Callable[[Batch], dict]], Iterable[dict]], rank: int, world: int,
                 max_steps: int, progress=None, callbacks: Sequence[TrainerCallback] = (),
                 trainer_class: type[SoftTargetTrainer] = SoftTargetTrainer) -> SoftTargetTrainer:
    """The soft-target Trainer over this rank's batches, with the side concerns as callbacks:
    rank 0's progress lines and ``progress.json``, MLflow's step figures, then ``callbacks``.
    ``max_steps``: the main training's; balanced fine-tuning's ``request.balanced_steps`` follow."""
    g = request.generation
    collate = TokenCount(make_collate(student.tokenizer, len(request.label_names), cfg.model.max_length))
    trainer = trainer_class(
        model=student.model,
        args=student.args,
        train_dataset=BatchStream(train_batches(collate)),
        processing_class=student.tokenizer,
        lr_window=request.lr_window,
        ewc=EwcAnchor.read(request.ewc_anchor, cfg.method.ewc) if cfg.method.ewc and request.ewc_anchor else None,
        balanced=(max_steps, cfg.student.balanced_lr_factor) if request.balanced_steps else None,
        **loss_settings(cfg, g),
    )
    trainer.remove_callback(PrinterCallback)
    s = cfg.student
    trainer.add_callback(ProgressCallback(
        g, max_steps + request.balanced_steps, progress, rows_per_step=s.batch_size * s.grad_accum * world,
        workers=world, later_steps=request.later_steps, tokens=collate,
        dest=request.progress_dest if rank == 0 else None))
    if cfg.tracking.backend == "mlflow" and request.tracking_run_id:
        say = queue_say(progress) if progress is not None else print
        trainer.add_callback(MlflowStepLogger(request.tracking_uri, request.tracking_run_id, g, say))
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer


def train(trainer: SoftTargetTrainer, resume_from: str | None = None):
    """``trainer.train()``, from the in-generation checkpoint ``resume_from`` when given. Returns
    the Trainer's output and the step it resumed from (0: from the start)."""
    resumed_step = 0
    if resume_from is not None:
        resumed_step = int(TrainerState.load_from_json(os.path.join(resume_from, "trainer_state.json")).global_step)
    return trainer.train(resume_from_checkpoint=resume_from), resumed_step


def save(trainer: SoftTargetTrainer, student: Student, cfg: Config, request: StudentRequest, work: str,
         rank: int) -> str:
    """``<work>/model`` (and ``<work>/adapter`` under LoRA), complete on rank 0. Every rank takes
    part: under ZeRO-3 the save gathers the partitioned weights into one consolidated folder."""
    out_dir = os.path.join(work, MODEL)
    meta = {"generation": request.generation, "label_names": request.label_names, "config": cfg.to_dict()}
    if cfg.student.lora.r:  # the adapter, then the initial model with it merged in: a plain model folder
        save_lora_student(trainer, student.tokenizer, out_dir, os.path.join(work, ADAPTER), meta, rank == 0,
                          student.load_initial, base_model=request.init_model)
    else:
        save_student(trainer, student.tokenizer, out_dir, meta, is_rank0=rank == 0)
    return out_dir


def evaluation_share(out_dir: str, rank: int, world: int) -> tuple[Share, str]:
    """Who evaluates, and rank 0's saved model folder they read: the ranks on rank 0's host that
    see that folder (on one node, every rank; on a cluster, rank 0's node, the others wait in the
    collectives). Called after :func:`save`, on every rank: rank 0's folder is complete by then."""
    if world == 1:
        return Share(), out_dir
    here = (socket.gethostname(), out_dir)
    every: list = [None] * world
    dist.all_gather_object(every, here)
    host, source = every[0]
    sees = host == here[0] and os.path.isfile(os.path.join(source, "config.json"))
    flags: list = [None] * world
    dist.all_gather_object(flags, sees)
    return Share(rank, world, tuple(r for r, f in enumerate(flags) if f)), source


def evaluate(student: Student, cfg: Config, request: StudentRequest, slices: dict[str, Iterable[Batch]],
             rank: int, world: int, out_dir: str, on_gpu: bool) -> dict[str, Any]:
    """The saved model on each slice (holdout, validation, retention, extensions' holdouts),
    loaded as every other reader of it loads it (:func:`incr_ray.modeling.load_for_inference`: on
    a GPU bf16 with an fp32 head), so ``run.json``'s figures are those ``incr-ray evaluate`` and
    the next teacher get (not those of DeepSpeed's training module, whose head is 16-bit too). It
    saves the actor pool a separate evaluation would cost, and gathers no ZeRO-3 partitions:
    each evaluating rank holds the whole model and scores ``eval.batch_size`` rows per forward
    (:func:`evaluation_share`, :func:`incr_ray.generation.evaluation.evaluate_student`). Call it
    after :func:`release`: the training state is gone from the device.

    Rank 0 writes the holdout predictions to ``request.predictions_dest`` and, when calibrating,
    folds the fitted temperature into the saved model (and the evaluators into theirs)."""
    if not slices:
        return {}
    share, source = evaluation_share(out_dir, rank, world)
    model = tokenizer = None
    device = student.args.device
    if share.scores:
        model, tokenizer = load_for_inference(source, cfg, on_gpu, device=device, threads=cfg.cluster.cpus_per_worker)

    def fold(temperature: float) -> None:
        changed = fold_temperature(source, temperature) if rank == 0 else None
        if world > 1:
            names = [changed]
            dist.broadcast_object_list(names, src=0)  # also: rank 0 has rewritten the folder
            changed = names[0]
        if model is not None:
            load_saved_tensors(model, source, changed)

    evaluation = evaluate_student(model, tokenizer, slices, cfg, device, share, len(request.label_names), fold)
    predictions = evaluation.pop("predictions")
    if rank == 0 and request.predictions_dest:
        write_predictions(request.predictions_dest, *predictions)
    return evaluation


def consolidate(cfg: Config, request: StudentRequest, student: Student,
                train_batches: Callable[[Callable[[Batch], dict]], Iterable[dict]], rank: int, work: str,
                out_dir: str) -> dict[str, Any] | None:
    """``method.ewc > 0``, rank 0: the saved model's diagonal Fisher information on the first
    ``method.ewc_rows`` rows of this rank's training order (seeded by run.seed and the generation)
    and its weights, in ``<work>/fisher.safetensors`` for the caller to keep
    (:func:`incr_ray.generation.fisher.estimate_fisher`). Call it after :func:`evaluate`: a fitted
    temperature is folded into the saved head by then, and the next student starts from that."""
    if not cfg.method.ewc or rank != 0:
        return None
    collate = with_row_ids(make_collate(student.tokenizer, len(request.label_names), cfg.model.max_length))
    return estimate_fisher(cfg, request.generation, out_dir, train_batches(collate), student.args.device,
                           os.path.join(work, FISHER))


def balanced_record(cfg: Config, request: StudentRequest, trainer: SoftTargetTrainer,
                    steps: int) -> dict[str, Any] | None:
    """What balanced fine-tuning did (None when off): its rows, their cap per class, the optimizer
    ``steps`` it trained (those after the main training's), its learning rate and its mean loss
    over this rank's batches."""
    if not request.balanced_steps:
        return None
    losses = trainer.balanced_losses
    return {"rows": request.balanced_rows, "per_class": request.balanced_per_class, "steps": steps,
            "epochs": cfg.student.balanced_epochs,
            "learning_rate": cfg.student.learning_rate * cfg.student.balanced_lr_factor,
            "loss_mean": float(np.mean(losses)) if losses else None}


def release(trainer: SoftTargetTrainer) -> None:
    """Drop the engine, optimizer and master weights, and DeepSpeed's hold on later model loads
    (the process evaluates, and may train or load again: the GPU check, the tests)."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    unset_hf_deepspeed_config()


# ---------------------------------------------------------------------------------------------
# The recipe


def run_student(cfg: Config, request: StudentRequest,
                train_batches: Callable[[Callable[[Batch], dict]], Iterable[dict]],
                slices: dict[str, Iterable[Batch]], *, rank: int, world: int, work: str, on_gpu: bool,
                max_steps: int, progress=None, resume_from: str | None = None,
                callbacks: Sequence[TrainerCallback] = (),
                trainer_class: type[SoftTargetTrainer] = SoftTargetTrainer) -> dict[str, Any]:
    """One generation on this rank: set up, trainer, train, save, evaluate, consolidate. Returns its metrics.

    ``cfg`` has its ``auto`` values resolved (``deepspeed.stage``, ``cluster.cpus_per_worker``).
    ``train_batches(collate)`` gives this rank's training batches with ``collate`` (numpy batch ->
    model inputs) applied, once per iteration (an epoch): Ray Data's
    ``shard.iter_torch_batches(collate_fn=collate)``, or ``trainer.Collated(batches, collate)``;
    ``max_steps`` (the main training's steps) × ``student.grad_accum`` of them, then, when
    ``request.balanced_steps`` is set, that many steps' batches of the balanced set (balanced
    fine-tuning, at ``student.balanced_lr_factor`` of the learning rate). ``slices`` maps
    ``holdout`` (and ``validation``, ``retention``, ``holdout_gen_<j>``) to numpy batches with
    ``text``, ``label`` and ``row_id``, the same on every rank; empty: no evaluation.
    ``progress``: the queue rank 0's progress lines go to (``put_nowait``), or None.
    ``resume_from``: an in-generation Hugging Face checkpoint folder to continue from.
    ``callbacks``: more Trainer callbacks (the Ray glue's checkpoint reports, the test seam's faults).
    ``trainer_class``: :class:`SoftTargetTrainer` or a subclass (the GPU check's probe).

    Writes ``<work>/model`` (and ``<work>/adapter``, ``<work>/fisher.safetensors``), complete on
    rank 0, for the caller to keep.
    """
    entered = time.perf_counter()
    student = set_up(cfg, request, work, on_gpu, max_steps)
    trainer = make_trainer(cfg, request, student, train_batches, rank, world, max_steps, progress,
                           [*callbacks, clock := StepClock()], trainer_class)
    released = False
    try:
        started = time.perf_counter()
        output, resumed_step = train(trainer, resume_from)
        saving = time.perf_counter()
        out_dir = save(trainer, student, cfg, request, work, rank)
        balanced = balanced_record(cfg, request, trainer, int(output.global_step) - max_steps)
        facts = {"precision": precision_record(trainer, student.precision, student.args.hf_deepspeed_config.config),
                 "max_learning_rate": max((h["learning_rate"] for h in trainer.state.log_history
                                           if "learning_rate" in h), default=None),
                 "ewc": {"lambda": cfg.method.ewc, **(trainer.ewc.figures() if trainer.ewc else {})}}
        release(trainer)
        student.model, released = None, True  # the training module's last reference: its memory goes
        evaluating = time.perf_counter()
        evaluation = evaluate(student, cfg, request, slices, rank, world, out_dir, on_gpu)
        evaluated = time.perf_counter()
        fisher = consolidate(cfg, request, student, train_batches, rank, work, out_dir)
        s = cfg.student
        rows_per_step = s.batch_size * s.grad_accum * world
        return {
            "train_loss": float(output.training_loss),
            "resumed_from_step": resumed_step,
            "workers": world,
            "train_seconds": saving - started,
            # Where a generation's fixed cost goes: imports, model load and DeepSpeed set-up before
            # the first step, and the consolidated save after the last.
            "setup_seconds": started - entered,
            "steps": int(output.global_step),
            # The highest rate a logged step trained at: the peak, or the floor of `schedule: run` after its plan.
            "max_learning_rate": facts["max_learning_rate"],
            # Rows over the whole of train(): its own start (the engine's first step, a resume's
            # checkpoint load) included; the steady rate leaves the warm-up steps out (rates.steady_rate).
            "samples_per_second": (int(output.global_step) - resumed_step) * rows_per_step / (saving - started),
            **clock.rates(rows_per_step),
            "zero_stage": cfg.deepspeed.stage,
            "cpus_per_worker": cfg.cluster.cpus_per_worker,  # the number `auto` became
            "trainable_params": student.trainable_params,
            "total_params": student.total_params,
            "precision": facts["precision"],
            **evaluation,  # holdout, and validation / calibration / retention / drift when measured
            "eval_seconds": evaluated - evaluating,
            "save_seconds": evaluating - saving,  # the local save; the caller adds its upload
            # method.ewc: λ, the penalty against the teacher's Fisher, this model's own Fisher (rank 0)
            **({"ewc": {**facts["ewc"], **({"fisher": fisher} if fisher else {})}} if cfg.method.ewc else {}),
            **({"balanced": balanced} if balanced else {}),  # student.balanced_epochs: what the pass did
        }
    finally:
        if not released:
            release(trainer)
