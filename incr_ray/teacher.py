"""Teacher scoring: a model scores rows in a Ray Data actor pool.

``ClassifierScorer`` loads a generation's model once per actor and, per batch, returns either the
teacher's softmax and the soft target of every row (``mode="targets"``) or additive evaluation
statistics (``mode="stats"``). Resources — pool size, GPUs per actor, batch size — are set at the
``map_batches`` call in :func:`score_block` / :func:`evaluate_model`, never inside the class.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .config import Config
from .metrics import STAT_KEYS, batch_stats, finalize, merge_stats
from .targets import soft_targets, softmax

class ClassifierScorer:
    """Callable class for ``Dataset.map_batches``: one model per actor, inference mode."""

    def __init__(
        self,
        model_path: str,
        mode: str = "targets",
        max_length: int = 128,
        temperature: float = 1.0,
        threshold: float = 0.9,
        floor: float | None = None,
        ece_bins: int = 15,
        device_map_auto: bool = False,
        trust_remote_code: bool = False,
        num_threads: int | None = None,
        exit_at_batch: int | None = None,
        exit_marker: str | None = None,
    ):
        import torch

        from .modeling import load_classifier, load_tokenizer
        from .storage import stage_local

        if num_threads:
            torch.set_num_threads(num_threads)
        self.mode = mode
        self.batches = 0
        self.exit_at_batch = exit_at_batch  # fault-injection test hook
        self.exit_marker = exit_marker
        self.max_length = max_length
        self.temperature = temperature
        self.threshold = threshold
        self.floor = floor
        self.ece_bins = ece_bins
        local = stage_local(model_path)
        self.tokenizer = load_tokenizer(local, trust_remote_code)
        on_gpu = torch.cuda.is_available()
        self.dtype = None
        kwargs: dict[str, Any] = {}
        if on_gpu:
            self.dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            kwargs["dtype"] = self.dtype
            if device_map_auto:
                kwargs["device_map"] = "auto"  # spread a teacher larger than one GPU over this actor's GPUs
        elif device_map_auto:
            kwargs["device_map"] = "auto"
        self.model = load_classifier(local, trust_remote_code=trust_remote_code, tokenizer=self.tokenizer, **kwargs)
        if "device_map" not in kwargs:
            self.model.to("cuda" if on_gpu else "cpu")
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.num_labels = self.model.config.num_labels

    def logits(self, texts: list[str]) -> np.ndarray:
        from .modeling import classifier_logits

        return classifier_logits(self.model, self.tokenizer, texts, self.max_length, self.device, self.dtype)

    def __call__(self, batch: dict[str, np.ndarray]):
        self.batches += 1
        if self.exit_at_batch == self.batches and self.exit_marker and not os.path.exists(self.exit_marker):
            open(self.exit_marker, "w").close()
            os._exit(1)
        texts = [str(t) for t in batch["text"]]
        labels = np.asarray(batch["label"], dtype=np.int64)
        probs = softmax(self.logits(texts), self.temperature) if texts else np.zeros((0, self.num_labels))
        if self.mode == "stats":
            stats = batch_stats(probs, labels, num_bins=self.ece_bins)
            return {k: np.asarray(stats[k])[None, ...] for k in STAT_KEYS}
        if self.mode == "probs":
            return {"row_id": batch["row_id"], "probs": probs}
        target = soft_targets(probs, labels, threshold=self.threshold, floor=self.floor)
        return _with_list_columns(batch, teacher_probs=probs, target=target)


def _with_list_columns(batch: dict[str, np.ndarray], **matrices: np.ndarray):
    """The batch plus (n, C) matrices as plain list<double> columns, so the targets Parquet reads
    in pandas/pyarrow/Spark without Ray's tensor extension type."""
    import pyarrow as pa

    cols = {k: pa.array(v) for k, v in batch.items()}
    for name, m in matrices.items():
        c = m.shape[1]
        cols[name] = pa.FixedSizeListArray.from_arrays(pa.array(m.reshape(-1), pa.float64()), c).cast(
            pa.list_(pa.float64())
        )
    return pa.table(cols)


def _map_kwargs(cfg: Config, on_gpu: bool) -> dict[str, Any]:
    from ray.data import ActorPoolStrategy

    t = cfg.teacher
    kwargs: dict[str, Any] = dict(
        compute=ActorPoolStrategy(size=t.pool_size),
        num_cpus=t.cpus_per_actor,
    )
    if on_gpu and t.gpus_per_actor > 0:
        kwargs["num_gpus"] = t.gpus_per_actor
    return kwargs


def _scorer_kwargs(cfg: Config, model_path: str, mode: str, on_gpu: bool) -> dict[str, Any]:
    threads = None if on_gpu else max(1, int(cfg.teacher.cpus_per_actor))
    return dict(
        model_path=model_path,
        mode=mode,
        max_length=cfg.model.max_length,
        temperature=cfg.method.temperature,
        threshold=cfg.method.threshold,
        floor=cfg.method.floor,
        ece_bins=cfg.eval.ece_bins,
        device_map_auto=cfg.teacher.device_map_auto,
        trust_remote_code=cfg.model.trust_remote_code,
        num_threads=threads,
    )


def score_block(ds, model_path: str, cfg: Config, on_gpu: bool, exit_marker: str | None = None):
    """Teacher outputs for every row of ``ds`` (lazy): adds ``teacher_probs`` and ``target``."""
    # Read before the actors start: a pool holding every CPU would starve its own read tasks.
    ds = ds.materialize()
    kwargs = _scorer_kwargs(cfg, model_path, "targets", on_gpu)
    if cfg.test_hooks.teacher_exit_at_batch is not None:
        kwargs.update(exit_at_batch=cfg.test_hooks.teacher_exit_at_batch, exit_marker=exit_marker)
    return ds.map_batches(
        ClassifierScorer,
        fn_constructor_kwargs=kwargs,
        batch_size=cfg.teacher.batch_size,
        **_map_kwargs(cfg, on_gpu),
    )


def evaluate_model(ds, model_path: str, cfg: Config, on_gpu: bool) -> dict[str, float]:
    """Holdout metrics (accuracy, macro-F1, NLL, ECE) from additive per-batch statistics."""
    ds = ds.materialize()  # see score_block
    stats_ds = ds.map_batches(
        ClassifierScorer,
        fn_constructor_kwargs={**_scorer_kwargs(cfg, model_path, "stats", on_gpu), "temperature": 1.0},
        batch_size=cfg.eval.batch_size,
        **_map_kwargs(cfg, on_gpu),
    )
    rows = stats_ds.take_all()  # one small row per batch, not per example
    merged = merge_stats([{k: np.asarray(r[k]) for k in STAT_KEYS} for r in rows])
    return finalize(merged)

