"""CPUs for training workers and scoring actors: the rule behind ``auto``, and the check that a
config reaching the workers has none left.

``cluster.cpus_per_worker`` and ``teacher.cpus_per_actor`` default to ``auto``. On CPU a fixed
1 left a 2-core laptop training on one core; ``auto`` gives each of the ``n`` training workers
(or scoring actors) the most whole CPUs with which all ``n`` can be placed at once
(:func:`cpus_per_bundle`); on GPU each training worker gets its node's CPUs per GPU
(:func:`cpus_per_gpu`). ``incr_ray.resolve.resolve`` applies them, with the ZeRO stage, once per
run; the functions that hand a config to Ray (``fit_student``, ``score_block``, ``evaluate_model``)
only check that it was applied (:func:`require_resolved`).
"""

from __future__ import annotations

from ..config import Config

AUTO = "auto"


def cpus_per_bundle(node_cpus: list[float], bundles: int) -> int:
    """The most whole CPUs each of ``bundles`` equal reservations can hold with all of them placed
    at once, each on one node of ``node_cpus`` (CPUs per node); at least 1.

    >>> cpus_per_bundle([2.0], 1), cpus_per_bundle([2.0], 2), cpus_per_bundle([4.0, 1.0], 2)
    (2, 1, 2)
    """
    for cpus in range(int(max(node_cpus, default=1.0)), 1, -1):
        if sum(int(n // cpus) for n in node_cpus) >= bundles:
            return cpus
    return 1


def cpus_per_gpu(node_cpus: list[float], node_gpus: list[float]) -> int | None:
    """The whole CPUs each GPU of every GPU node can have (``node_cpus[i]`` CPUs and
    ``node_gpus[i]`` GPUs on node i): the smallest node's share, at least 1; None without a GPU node.

    A GPU worker's CPUs are its data loading's, its OpenMP threads' (Ray sets ``OMP_NUM_THREADS``
    to them) and, with ``deepspeed.offload_optimizer``, CPU Adam's, which on 1 CPU runs single-threaded.

    >>> cpus_per_gpu([96.0, 8.0], [8.0, 0.0]), cpus_per_gpu([48.0, 96.0], [4.0, 4.0]), cpus_per_gpu([2.0], [4.0])
    (12, 12, 1)
    """
    shares = [int(c // g) for c, g in zip(node_cpus, node_gpus) if g > 0]
    return max(1, min(shares)) if shares else None


def require_resolved(cfg: Config, caller: str) -> Config:
    """``cfg`` itself when its stage and CPUs are numbers; a one-line error naming the fix when not."""
    left = [name for name, value in (("deepspeed.stage", cfg.deepspeed.stage),
                                     ("cluster.cpus_per_worker", cfg.cluster.cpus_per_worker),
                                     ("teacher.cpus_per_actor", cfg.teacher.cpus_per_actor)) if value == AUTO]
    if left:
        raise ValueError(f"{caller} needs a resolved config ({', '.join(left)}: auto); pass it through "
                         "incr_ray.resolve.resolve(cfg, incr_ray.resolve.probe_cluster()) first")
    return cfg
