"""The Hugging Face side of student training, free of Ray: training arguments, the batch collate
and the stream of batches, the soft-target ``Trainer`` and the save.

The student recipe (:mod:`incr_ray.generation.recipe`) runs these pieces, on a Ray Train worker or
wherever a ``torch.distributed`` group exists.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainingArguments
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from ..config import Config
from ..lora import merged_model, save_adapter
from ..method.hashing import generation_seed
from ..method.losses import distillation_loss
from ..method.schedule import annealed_alpha, balanced_tail_factor, linear_lr_factor, run_lr_factor
from ..modeling import PRECISION_FIX, NonFiniteError
from .deepspeed_config import build_deepspeed_config
from .fisher import EwcAnchor

MODEL_META = "incr_ray.json"  # beside the weights: generation, label names, resolved config


def steps_for(rows: int, workers: int, batch_size: int, epochs: float, grad_accum: int, min_steps: int = 0) -> int:
    """Optimizer steps for one generation: every worker sees ``rows // workers`` rows per epoch,
    ``epochs`` times, and at least ``min_steps`` steps are taken (more passes over a small block)."""
    per_worker = max(1, rows // workers)
    batches_per_epoch = math.ceil(per_worker / batch_size)
    return max(1, min_steps, math.ceil(batches_per_epoch * epochs / grad_accum))


def generation_steps(cfg: Config, rows: int) -> int:
    """:func:`steps_for` with the run's student and cluster settings."""
    s = cfg.student
    return steps_for(rows, cfg.cluster.workers, s.batch_size, s.epochs, s.grad_accum, s.min_steps)


def with_expected_replay(cfg: Config, rows: int, classes: int) -> int:
    """The training rows a generation after the first is planned with: its block's ``rows`` and
    ``replay.fraction`` of them, or ``replay.per_class`` of each of the run's ``classes``."""
    if cfg.replay.memory:
        return rows + cfg.replay.per_class * classes
    return round(rows * (1 + cfg.replay.fraction))


def planned_steps(cfg: Config, block_rows: list[int], classes: int = 0) -> list[int]:
    """Optimizer steps of each of the k planned generations, from the block sizes (replay adds its
    expected rows from generation 1 on, :func:`with_expected_replay`; ``classes``: the run's).
    Balanced fine-tuning's steps are not planned: they come after the main training's schedule."""
    return [generation_steps(cfg, with_expected_replay(cfg, rows, classes) if j else rows)
            for j, rows in enumerate(block_rows[:cfg.method.k])]


def run_lr_window(cfg: Config, block_rows: list[int], generation: int, classes: int = 0) -> tuple[int, int, int]:
    """``(offset, warmup, total)`` of generation ``generation`` on the run-long learning-rate
    schedule (``student.schedule: run``): the run-wide step it starts at, the warmup steps and the
    steps of the k planned generations. Planned from the block sizes (replay adds its expected
    rows from generation 1 on), so every generation places itself the same way whatever the others
    actually ran."""
    k = cfg.method.k
    planned = planned_steps(cfg, block_rows, classes)
    total = sum(planned)
    offset = sum(planned[:generation]) if generation < k else total
    return offset, min(int(cfg.student.warmup_ratio * planned[0]), total - 1), total


def make_collate(tokenizer, num_labels: int, max_length: int):
    """Numpy batch -> model inputs with dynamic padding, ``labels`` and ``targets``."""

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        texts = [str(t) for t in batch["text"]]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64))
        if "target" in batch:
            targets = torch.from_numpy(np.stack(list(batch["target"])).astype(np.float32))
        else:  # generation 0: one-hot targets make the soft loss ordinary cross-entropy
            targets = torch.nn.functional.one_hot(labels, num_labels).float()
        return {**enc, "labels": labels, "targets": targets}

    return collate


class Collated:
    """Numpy batches (a list, or anything iterable more than once) collated as they are read: one
    pass per iteration, as Ray Data's ``iter_torch_batches(collate_fn=...)`` gives over a shard."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], collate: Callable[[dict], dict]):
        self.batches, self.collate = batches, collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self.collate(batch) for batch in self.batches)


class BatchStream(IterableDataset):
    """A rank's training batches, already collated, as the Trainer's dataset: one batch per step,
    as they come (each iteration is one epoch). See :meth:`SoftTargetTrainer.get_train_dataloader`."""

    def __init__(self, batches: Iterable[dict[str, Any]]):
        self.batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.batches)


def _the_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def precision_record(trainer: "SoftTargetTrainer", precision: str, ds_config: dict[str, Any]) -> dict[str, str]:
    """The dtypes one generation actually trained with, for run.json."""
    weights = _dtype_name(next(trainer.model.parameters()).dtype)
    zero = ds_config["zero_optimization"]["stage"]
    engine = getattr(trainer, "deepspeed", None)
    return {
        "requested": precision,
        "model_weights": weights,  # the module DeepSpeed runs forward/backward on
        # DeepSpeed keeps an fp32 master copy in the optimizer whenever the module is 16-bit and
        # ZeRO is on (stage 0 with 16 bits is refused, see deepspeed_config.precision_problem).
        "master_weights": "fp32" if weights == "fp32" or zero >= 1 else weights,
        "grad_accum": ds_config["data_types"]["grad_accum_dtype"],
        # What the engine sums the ranks' gradients in (its communication_data_type, the training
        # dtype unless the config sets it), as it read its config.
        "grad_reduce": (_dtype_name(engine.communication_data_type) if engine is not None
                        else ds_config.get("communication_data_type", weights)),
        **{f"loss_{k}": v for k, v in trainer.loss_dtypes.items()},
    }


class SoftTargetTrainer(Trainer):
    """``compute_loss`` = forward pass + :func:`incr_ray.method.losses.distillation_loss` (+ the EWC
    penalty against the teacher's Fisher file, ``ewc``: :class:`incr_ray.generation.fisher.EwcAnchor`)."""

    def __init__(self, *args, temperature: float = 1.0, alpha: float = 0.0, anneal: bool = False,
                 lr_window: tuple[int, int, int] | None = None, ewc: EwcAnchor | None = None,
                 balanced: tuple[int, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ewc = ewc
        # Balanced fine-tuning (student.balanced_epochs): (the main training's steps, the tail's
        # share of the peak learning rate). Its steps follow the main ones in the same train().
        self.balanced = balanced
        self.balanced_losses: list[float] = []
        self.temperature = temperature
        self.alpha = alpha
        self.anneal = anneal  # teacher annealing: the hard-label weight rises from alpha to 1
        self.lr_window = lr_window  # (offset, warmup, total) on the run-long schedule, or None
        # Our loss is a per-batch mean; let the Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.loss_dtypes: dict[str, str] = {}  # what reached the loss, recorded in run.json
        self._checkpointing = False  # inside _save_checkpoint (an in-generation checkpoint)

    def _save_checkpoint(self, model, trial):
        self._checkpointing = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._checkpointing = False

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # An in-generation checkpoint under DeepSpeed: the engine's own save_checkpoint (the
        # Trainer's next call) writes what a resume loads — the partitioned fp32 master weights and
        # optimizer states (and, below ZeRO-3, the 16-bit module) — so the model's weights are not
        # written a second time; under ZeRO-3 that also skips gathering the 16-bit weights from
        # every rank onto rank 0. The final save (save_student) still writes the consolidated model.
        if self._checkpointing and self.is_deepspeed_enabled:
            return
        super().save_model(output_dir, _internal_call)

    def get_train_dataloader(self):
        # A rank's batches are its own shard, made and collated already: no sampler, no re-batching,
        # and no accelerate wrapping, which would split them again over the ranks.
        if isinstance(self.train_dataset, BatchStream):
            return DataLoader(self.train_dataset, batch_size=1, collate_fn=_the_batch)
        return super().get_train_dataloader()

    def _prepare_inputs(self, inputs):
        # Under DeepSpeed the Trainer casts every float input to the engine's dtype: bf16 targets
        # would turn 0.9 into 0.8984 and rows would no longer sum to 1. Targets stay fp32.
        targets = inputs.pop("targets")
        prepared = super()._prepare_inputs(inputs)
        prepared["targets"] = targets.to(self.args.device, dtype=torch.float32)
        return prepared

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop("targets")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        if not self.loss_dtypes:
            self.loss_dtypes = {"targets": _dtype_name(targets.dtype), "logits": _dtype_name(outputs.logits.dtype)}
        main_steps = self.balanced[0] if self.balanced else self.state.max_steps
        # Annealing spans the main training; the balanced pass after it trains at its end point.
        alpha = annealed_alpha(self.alpha, self.state.global_step, main_steps) if self.anneal else self.alpha
        loss = distillation_loss(outputs.logits, targets, labels, self.temperature, alpha)
        if self.ewc is not None:  # self.model: the module itself (DeepSpeed's engine wraps `model`)
            loss = self.ewc.added_to(loss, self.model)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"the student's loss is {loss.item()} at step {self.state.global_step}; {PRECISION_FIX}")
        if self.balanced and self.state.global_step >= main_steps:
            self.balanced_losses.append(float(loss.detach()))
        return (loss, outputs) if return_outputs else loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # DeepSpeed's integration calls this too (on a shallow copy), when the optimizer is DeepSpeed's.
        if (self.lr_window is None and self.balanced is None) or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_window is not None:
            offset, warmup, total = self.lr_window

            def main(step: int) -> float:
                return run_lr_factor(offset + step, warmup, total)
        else:  # the Trainer's own linear schedule, over the main training's steps
            main_steps = self.balanced[0]
            warmup = self.args.get_warmup_steps(main_steps)

            def main(step: int) -> float:
                return linear_lr_factor(step, warmup, main_steps)
        factor = main
        if self.balanced is not None:
            main_steps, tail = self.balanced

            def factor(step: int) -> float:
                return balanced_tail_factor(step, main_steps, main(step), tail)
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer if optimizer is not None else self.optimizer,
                                                              factor)
        return self.lr_scheduler


# tracking.backend -> the Hugging Face Trainer's own integrations that log the per-step figures
# (mlflow is logged by incr-ray's own callback, into the generation's nested run).
REPORT_TO = {"tensorboard": ["tensorboard"], "wandb": ["wandb"]}


def reporting_env(cfg: Config, log_dir: str | None) -> dict[str, str]:
    """What HF's TensorBoard and W&B callbacks read from the environment: the generation's log
    folder, the W&B project."""
    if cfg.tracking.backend == "tensorboard" and log_dir:
        return {"TENSORBOARD_LOGGING_DIR": log_dir}
    if cfg.tracking.backend == "wandb":
        return {"WANDB_PROJECT": cfg.tracking.experiment}
    return {}


def training_arguments(cfg: Config, generation: int, max_steps: int, output_dir: str,
                       on_gpu: bool, precision: str, main_steps: int | None = None) -> TrainingArguments:
    """One generation's ``TrainingArguments``; DeepSpeed's config is built from the same settings.
    ``max_steps``: all its steps; ``main_steps``: those before balanced fine-tuning, which the
    warmup is a share of (default: all)."""
    s = cfg.student
    seed = generation_seed(cfg.run.seed, generation)
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        warmup_steps=int(s.warmup_ratio * (main_steps or max_steps)),
        max_steps=max_steps,
        lr_scheduler_type="linear",
        logging_steps=max(1, max_steps // 10),
        # In-generation checkpoints (a restarted worker group continues instead of starting over)
        # are saved when checkpoints.CheckpointCadence says, by steps or by time, and never at the
        # last step, which the Trainer's own "steps" strategy would add.
        save_strategy="no",
        save_total_limit=1,
        report_to=REPORT_TO.get(cfg.tracking.backend, []),
        run_name=f"{cfg.run.name}-gen_{generation:03d}",
        deepspeed=build_deepspeed_config(cfg.deepspeed, on_gpu, precision),
        use_cpu=not on_gpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=s.gradient_checkpointing,
        torch_compile=s.torch_compile,
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def loss_settings(cfg: Config, generation: int) -> dict[str, Any]:
    """Generation 0 learns one-hot labels: plain cross-entropy, no temperature, no hard mix."""
    if generation == 0:
        return {"temperature": 1.0, "alpha": 0.0, "anneal": False}
    return {"temperature": cfg.method.temperature, "alpha": cfg.method.alpha, "anneal": cfg.method.anneal}


def save_student(trainer: Trainer, tokenizer, out_dir: str, meta: dict[str, Any], is_rank0: bool) -> None:
    """Write a model folder that ``transformers.pipeline`` loads.

    Every rank must call this: under ZeRO-3 the save gathers the partitioned 16-bit weights.
    """
    trainer.save_model(out_dir)
    if is_rank0:
        _finish_model_folder(tokenizer, out_dir, meta)


def _finish_model_folder(tokenizer, out_dir: str, meta: dict[str, Any]) -> None:
    tokenizer.save_pretrained(out_dir)
    stray = os.path.join(out_dir, "training_args.bin")  # a pickle; never ship it
    if os.path.exists(stray):
        os.unlink(stray)
    with open(os.path.join(out_dir, MODEL_META), "w") as f:
        json.dump(meta, f, indent=2)


def save_lora_student(trainer: Trainer, tokenizer, out_dir: str, adapter_dir: str, meta: dict[str, Any],
                      is_rank0: bool, load_initial: Callable[[], torch.nn.Module], base_model: str) -> None:
    """A LoRA student: its adapter in ``adapter_dir``, and in ``out_dir`` the folder
    :func:`save_student` would write, holding the initial model with the adapter merged in.

    Every rank must call this (ZeRO-3 gathers the adapter); rank 0 then loads the initial model
    once more, whole and on the CPU, and merges. ``base_model`` is the initial model's location
    recorded in the adapter's config.
    """
    save_adapter(trainer, adapter_dir, out_dir + "-adapter-save", base_model, is_rank0)
    if not is_rank0:
        return
    dtype = next(trainer.model.parameters()).dtype  # what a full fine-tune would have saved
    # Rank 0 alone must not load the model partitioned: ZeRO-3's load-time partitioning (on while
    # the Trainer's DeepSpeed config is registered) would wait for the other ranks.
    unset_hf_deepspeed_config()
    try:
        merged = merged_model(load_initial, adapter_dir, dtype)
    finally:
        registered = getattr(trainer.args, "hf_deepspeed_config", None)
        if registered is not None:
            set_hf_deepspeed_config(registered)
    merged.save_pretrained(out_dir)
    del merged
    _finish_model_folder(tokenizer, out_dir, meta)
