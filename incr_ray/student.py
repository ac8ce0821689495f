"""Student training: an HF ``Trainer`` with soft-target loss, run by Ray Train with DeepSpeed ZeRO.

Two halves, kept apart: :func:`train_per_worker` runs on every Ray Train worker (reads its Ray
Data shard, trains, saves a consolidated model from every rank), and :func:`fit_student` is the
driver side (builds the ``TorchTrainer``, runs it, copies the model into ``gen_<g>/model``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import Config
from .deepspeed_config import build_deepspeed_config, resolve_precision
from .losses import distillation_loss

MODEL_META = "incr_ray.json"


def steps_for(rows: int, workers: int, batch_size: int, epochs: float, grad_accum: int) -> int:
    """Optimizer steps for one generation: every worker sees ``rows // workers`` rows per epoch."""
    per_worker = max(1, rows // workers)
    batches_per_epoch = math.ceil(per_worker / batch_size)
    return max(1, math.ceil(batches_per_epoch * epochs / grad_accum))


SHUFFLE_KEY = "_shuffle_key"


def shuffled_for_training(train_ds, seed: int):
    """The rows in a seeded random order that depends on the rows and the seed only.

    Sources are often sorted (by class, by date), and a block keeps its source's order: the
    Rotten Tomatoes file starts with all 1,097 plot summaries. Fine-tuning on long runs of one
    class wrecks the model, so every generation trains on its rows shuffled.

    The order is a sort by a per-row-id hash (:func:`incr_ray.data.shuffle_keys`), not Ray Data's
    ``random_shuffle``: that one seeds each input block by its position, so the same rows arriving
    from the teacher pool in another block order were trained in another order, and a resumed
    run ended with a different model than an uninterrupted one.
    """
    import pyarrow as pa

    from .data import shuffle_keys

    def keyed(batch: pa.Table) -> pa.Table:
        keys = shuffle_keys(batch.column("row_id").to_numpy(), seed)
        return batch.append_column(SHUFFLE_KEY, pa.array(keys, type=pa.int64()))

    # The key column stays: a map after the sort (drop_columns) may emit blocks out of order, and
    # the collate reads only the columns it needs.
    return train_ds.map_batches(keyed, batch_format="pyarrow").sort(SHUFFLE_KEY)


def make_collate(tokenizer, num_labels: int, max_length: int):
    """Ray Data batch (numpy dict) -> model inputs with dynamic padding, labels and targets."""

    def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        texts = [str(t) for t in batch["text"]]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = torch.from_numpy(np.array(batch["label"], dtype=np.int64))
        if "target" in batch:
            targets = torch.from_numpy(np.stack(list(batch["target"])).astype(np.float32))
        else:  # generation 0: one-hot targets make the soft loss ordinary cross-entropy
            targets = torch.nn.functional.one_hot(labels, num_labels).float()
        return {**enc, "labels": labels, "targets": targets}

    return collate


def _soft_target_trainer_class():
    from transformers import Trainer

    class SoftTargetTrainer(Trainer):
        """``compute_loss`` = forward pass + :func:`incr_ray.losses.distillation_loss`."""

        def __init__(self, *args, temperature: float = 1.0, alpha: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.temperature = temperature
            self.alpha = alpha
            # Our loss is a per-batch mean; let the Trainer scale it for gradient accumulation.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            targets = inputs.pop("targets")
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = distillation_loss(outputs.logits, targets, labels, self.temperature, self.alpha)
            return (loss, outputs) if return_outputs else loss

    return SoftTargetTrainer


def _exit_once_callback(step: int, marker: str):
    """Test hook: rank 1 dies (``os._exit``) at ``step``, once per run (a marker file remembers)."""
    from transformers import TrainerCallback

    class ExitOnce(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            import ray.train

            if (
                state.global_step == step
                and ray.train.get_context().get_world_rank() == 1
                and not os.path.exists(marker)
            ):
                open(marker, "w").close()
                # Ray Train's controller registers reported checkpoints on its next poll; a crash
                # within milliseconds of a save would race that. Real crashes come later.
                time.sleep(3)
                os._exit(1)

    return ExitOnce()


def _progress_callback(generation: int, max_steps: int, queue):
    """One concise line per logging step from rank 0, sent to the driver's console through a Ray
    queue (worker stdout is not forwarded: it would bury these lines under library chatter)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs and "loss" in logs:
                line = (f"[gen {generation}] step {state.global_step}/{max_steps}  "
                        f"loss {float(logs['loss']):.4f}  lr {float(logs.get('learning_rate', 0)):.2e}")
                try:
                    queue.put_nowait(line)
                except Exception:  # noqa: BLE001 - progress must never fail training
                    pass

    return Progress()


class _ProgressRelay:
    """Driver side of the progress queue: prints what rank 0 sends while ``fit`` runs."""

    def __init__(self, say):
        import threading

        from ray.util.queue import Queue

        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self.say = say
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._relay, daemon=True)

    def _relay(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.say(self.queue.get(timeout=0.5))
            except Empty:
                if self.done.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue actor went away with the cluster
                return

    def __enter__(self) -> "_ProgressRelay":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        import ray

        ray.kill(self.queue.actor)


def _quiet_worker_logs() -> None:
    """Workers print our progress lines; DeepSpeed's and Ray Train's INFO chatter would bury them."""
    import logging

    for name in ("DeepSpeed", "deepspeed", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _in_generation_checkpoint(work: str) -> tuple[str | None, int]:
    """(HF checkpoint folder, its step) when this worker group restarts after a failure."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, 0
    local = ckpt.to_directory(os.path.join(work, "resume"))
    hf = os.path.join(local, "checkpoint")  # RayTrainReportCallback's layout
    state = os.path.join(hf, "trainer_state.json")
    if not os.path.isfile(state):
        return None, 0
    with open(state) as f:
        return hf, int(json.load(f).get("global_step", 0))


def evaluate_in_worker(model, tokenizer, cfg: Config, device) -> dict[str, float]:
    """Holdout metrics from the model still in memory, saving the actor pool (process start,
    imports, model load) a separate evaluation would cost.

    Every rank reads the whole (unsplit) holdout: under ZeRO-3 each forward gathers parameters
    from all ranks, so all must run the same forwards. Rank 0's figures are the ones reported.
    """
    import ray.train

    from .metrics import batch_stats, finalize, merge_stats
    from .modeling import classifier_logits
    from .targets import softmax

    model.eval()
    stats = []
    holdout = ray.train.get_dataset_shard("holdout")
    for batch in holdout.iter_batches(batch_size=cfg.eval.batch_size, batch_format="numpy"):
        texts = [str(t) for t in batch["text"]]
        logits = classifier_logits(model, tokenizer, texts, cfg.model.max_length, device)
        labels = np.asarray(batch["label"], dtype=np.int64)
        stats.append(batch_stats(softmax(logits), labels, num_bins=cfg.eval.ece_bins))
    return finalize(merge_stats(stats))


def train_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: one generation of student training."""
    entered = time.perf_counter()
    cfg = Config.model_validate(loop_config["config"])
    on_gpu: bool = loop_config["on_gpu"]
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
    import ray.train
    import torch
    from transformers import TrainingArguments

    from .modeling import load_classifier, load_tokenizer
    from .storage import stage_local

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    _quiet_worker_logs()
    import deepspeed

    # Ray Train already made the torch process group; DeepSpeed's comm layer must wrap it before
    # ZeRO-3 partitions weights at load time, or it sees a world of one.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if not on_gpu:
        torch.set_num_threads(cfg.cluster.cpus_per_worker)
    label_names: list[str] = loop_config["label_names"]
    s = cfg.student

    bf16_ok = on_gpu and torch.cuda.is_bf16_supported()
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_ok)
    work = tempfile.mkdtemp(prefix=f"incr-ray-g{loop_config['generation']}-r{rank}-")
    max_steps = loop_config["max_steps"]
    args = TrainingArguments(
        output_dir=os.path.join(work, "hf"),
        per_device_train_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate,
        weight_decay=s.weight_decay,
        warmup_steps=int(s.warmup_ratio * max_steps),
        max_steps=max_steps,
        lr_scheduler_type="linear",
        logging_steps=max(1, max_steps // 10),
        # In-generation checkpoints let a restarted worker group continue instead of starting over.
        save_strategy="steps" if s.checkpoint_every_steps else "no",
        save_steps=s.checkpoint_every_steps or 500,
        save_total_limit=1,
        report_to=[],
        deepspeed=build_deepspeed_config(cfg.deepspeed, on_gpu, precision),
        use_cpu=not on_gpu,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        gradient_checkpointing=s.gradient_checkpointing,
        seed=cfg.run.seed + loop_config["generation"],
        data_seed=cfg.run.seed + loop_config["generation"],
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )

    # After TrainingArguments so that ZeRO-3 partitions the weights while they load.
    init_path = stage_local(loop_config["init_model"])
    tokenizer = load_tokenizer(init_path, cfg.model.trust_remote_code)
    model = load_classifier(init_path, label_names, cfg.model.trust_remote_code, tokenizer=tokenizer)

    shard = ray.train.get_dataset_shard("train")
    train_iterable = shard.iter_torch_batches(
        batch_size=s.batch_size,
        collate_fn=make_collate(tokenizer, len(label_names), cfg.model.max_length),
    )

    from ray.train.huggingface.transformers import prepare_trainer

    trainer = _soft_target_trainer_class()(
        model=model,
        args=args,
        train_dataset=train_iterable,
        processing_class=tokenizer,
        temperature=cfg.method.temperature if loop_config["generation"] > 0 else 1.0,
        alpha=cfg.method.alpha if loop_config["generation"] > 0 else 0.0,
    )
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(loop_config["generation"], max_steps, loop_config["progress"]))
    hook_step = cfg.test_hooks.worker_exit_at_step
    if hook_step is not None:
        trainer.add_callback(_exit_once_callback(hook_step, loop_config["hook_marker"]))
    if s.checkpoint_every_steps:
        from ray.train.huggingface.transformers import RayTrainReportCallback

        trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)

    resume_from, resumed_step = _in_generation_checkpoint(work)
    started = time.perf_counter()
    output = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - started
    saving = time.perf_counter()

    # Every rank takes part: under ZeRO-3 the save gathers the partitioned 16-bit weights.
    out_dir = os.path.join(work, "model")
    trainer.save_model(out_dir)
    saved = time.perf_counter()
    holdout_metrics = evaluate_in_worker(trainer.model, tokenizer, cfg, args.device) if loop_config.get("evaluate") else None
    eval_seconds = time.perf_counter() - saved
    # Which nodes the worker group spanned: users (and the multi-node test) can see placement.
    import torch.distributed as dist

    nodes = [None] * ctx.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    metrics = {
        "train_loss": float(output.training_loss),
        "resumed_from_step": resumed_step,
        "workers": ctx.get_world_size(),
        "nodes": len(set(nodes)),
        "train_seconds": seconds,
        # Where a generation's fixed cost goes: imports, model load and DeepSpeed set-up before the
        # first step, and the consolidated save after the last.
        "setup_seconds": started - entered,
        "steps": int(output.global_step),
        "samples_per_second": max_steps * s.batch_size * s.grad_accum * ctx.get_world_size() / seconds,
        "precision": precision,
    }
    if holdout_metrics is not None:
        metrics.update(holdout=holdout_metrics, eval_seconds=eval_seconds)
    checkpoint = None
    if rank == 0:
        tokenizer.save_pretrained(out_dir)
        stray = os.path.join(out_dir, "training_args.bin")  # a pickle; never ship it
        if os.path.exists(stray):
            os.unlink(stray)
        with open(os.path.join(out_dir, MODEL_META), "w") as f:
            json.dump(
                {"generation": loop_config["generation"], "label_names": label_names,
                 "config": loop_config["config"]}, f, indent=2,
            )
        checkpoint = ray.train.Checkpoint.from_directory(out_dir)
    metrics["save_seconds"] = time.perf_counter() - saving - eval_seconds
    ray.train.report(metrics, checkpoint=checkpoint)


@dataclass
class StudentResult:
    model_path: str
    metrics: dict[str, Any]


def fit_student(
    cfg: Config,
    generation: int,
    train_ds,
    rows: int,
    init_model: str,
    label_names: list[str],
    model_dest: str,
    ray_storage: str,
    on_gpu: bool,
    say=print,
    holdout_ds=None,
) -> StudentResult:
    """Driver side: train generation ``generation`` on ``train_ds`` and put the model at ``model_dest``.

    With ``holdout_ds`` the workers also evaluate the trained model on it (``metrics["holdout"]``).
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .storage import upload_dir

    s = cfg.student
    # Ray Train's controller polls the workers every 2 s by default, so a finished generation sat
    # idle for up to 2 s before shutdown. Read by TorchTrainer.fit(); a user's own setting wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    # Materialize first: training workers may hold every CPU of the cluster, and a lazy dataset
    # would then wait forever for a CPU to run its read tasks on.
    train_ds = shuffled_for_training(train_ds, seed=cfg.run.seed * 1000 + generation).materialize()
    datasets = {"train": train_ds}
    if holdout_ds is not None:
        datasets["holdout"] = holdout_ds.materialize()
    max_steps = steps_for(rows, cfg.cluster.workers, s.batch_size, s.epochs, s.grad_accum)
    name = f"gen_{generation:03d}-{int(time.time())}"
    trainer = TorchTrainer(
        train_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "generation": generation,
            "label_names": label_names,
            "init_model": init_model,
            "max_steps": max_steps,
            "on_gpu": on_gpu,
            "evaluate": holdout_ds is not None,
            "hook_marker": f"{ray_storage}/{name}.worker-exit-hook",
            "progress": None,  # set below
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers,
            use_gpu=on_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if on_gpu else {})},
        ),
        run_config=RunConfig(
            name=name,
            storage_path=ray_storage,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=["train"]),  # every worker reads the whole holdout
    )
    started = time.perf_counter()
    with _ProgressRelay(say) as relay:
        trainer.train_loop_config["progress"] = relay.queue
        result = trainer.fit()
    fit_seconds = time.perf_counter() - started
    if result.checkpoint is None:
        raise RuntimeError(f"generation {generation}: training finished without a model checkpoint")
    with result.checkpoint.as_directory() as local:
        upload_dir(local, model_dest)
    from .storage import remove_tree

    remove_tree(f"{ray_storage}/{name}")  # the model now lives in gen_<g>/model
    metrics = dict(result.metrics or {})
    metrics["max_steps"] = max_steps
    metrics["fit_seconds"] = fit_seconds  # driver wall time of TorchTrainer.fit, start-up included
    return StudentResult(model_path=model_dest, metrics=metrics)
