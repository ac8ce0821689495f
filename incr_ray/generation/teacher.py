"""Teacher scoring: a model scores a block in a Ray Data actor pool.

:class:`TargetScorer` loads the teacher once per actor and turns each batch into the teacher's
softmax and the soft target of every row. Resources — pool size, CPUs and GPUs per actor, batch
size — are set at the ``map_batches`` call in :func:`score_block`, never inside the class.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .. import faults
from ..config import Config
from ..method.targets import soft_targets, softmax
from ..modeling import classifier_logits, load_for_inference


class TargetScorer:
    """``map_batches`` class: adds ``teacher_probs`` and ``target`` to every row of a batch."""

    def __init__(self, model_path: str, cfg: Config, on_gpu: bool):
        self.model, self.tokenizer = load_for_inference(model_path, cfg, on_gpu)
        self.max_length = cfg.model.max_length
        self.method = cfg.method
        self.batches = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        self.batches += 1
        faults.kill_teacher_before_batch(self.batches)
        logits = classifier_logits(self.model, self.tokenizer, [str(t) for t in batch["text"]], self.max_length)
        probs = softmax(logits, self.method.temperature)
        labels = np.asarray(batch["label"], dtype=np.int64)
        target = soft_targets(probs, labels, threshold=self.method.threshold, floor=self.method.floor)
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


def score_block(ds, model_path: str, cfg: Config, on_gpu: bool):
    """Teacher outputs for every row of ``ds`` (lazy): adds ``teacher_probs`` and ``target``."""
    # Read before the actors start: a pool holding every CPU would starve its own read tasks.
    ds = ds.materialize()
    resources, actor_gpu = scoring_pool(cfg, on_gpu)
    return ds.map_batches(
        TargetScorer,
        fn_constructor_kwargs={"model_path": model_path, "cfg": cfg, "on_gpu": actor_gpu},
        batch_size=cfg.teacher.batch_size,
        **resources,
    )
