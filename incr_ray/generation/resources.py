"""CPUs for training workers and scoring actors: ``auto`` resolved against the Ray cluster.

``cluster.cpus_per_worker`` and ``teacher.cpus_per_actor`` default to ``auto``. On CPU a fixed
1 left a 2-core laptop training on one core; ``auto`` gives each of the ``n`` training workers
(or scoring actors) the most whole CPUs with which all ``n`` can be placed at once. Training and
scoring never run at the same time, so each may take the whole cluster. On GPU clusters the CPUs
feed GPUs rather than compute, and ``auto`` stays at 1, as before.

The rule (:func:`cpus_per_bundle`) is pure; :func:`with_cpus` reads the live cluster and is
applied once per run (``incr_ray.run.folder.open_run``, which says the choice) and again by the
functions a benchmark or test may call directly (``fit_student``, ``score_block``), where it is a
no-op for a config already resolved.
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


def cluster_node_cpus() -> list[float]:
    """CPUs of each live node of the connected Ray cluster."""
    # Imported here: teacher.py imports this module and must import where Ray is absent
    # (benchmarks/gpu_check.py drives the scorer on a bare GPU machine).
    import ray

    return [float(n.get("Resources", {}).get("CPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def with_cpus(cfg: Config, on_gpu: bool, node_cpus: list[float] | None = None, say=None) -> Config:
    """``cfg`` with ``cluster.cpus_per_worker`` and ``teacher.cpus_per_actor`` ``auto`` resolved to
    numbers (``node_cpus``: the cluster's, read when not given). ``say`` hears each choice."""
    worker_auto, actor_auto = cfg.cluster.cpus_per_worker == AUTO, cfg.teacher.cpus_per_actor == AUTO
    if not (worker_auto or actor_auto):
        return cfg
    if on_gpu:
        worker, actor, why = 1, 1.0, "GPU cluster: the CPUs feed the GPUs"
    else:
        node_cpus = cluster_node_cpus() if node_cpus is None else node_cpus
        worker = cpus_per_bundle(node_cpus, cfg.cluster.workers)
        actor = float(cpus_per_bundle(node_cpus, cfg.teacher.pool_size))
        why = f"{sum(node_cpus):g} CPUs on {len(node_cpus)} node(s)"
    update = {}
    if worker_auto:
        update["cluster"] = cfg.cluster.model_copy(update={"cpus_per_worker": worker})
        if say:
            say(f"cluster.cpus_per_worker auto -> {worker} for {cfg.cluster.workers} worker(s) ({why})")
    if actor_auto:
        update["teacher"] = cfg.teacher.model_copy(update={"cpus_per_actor": actor})
        if say:
            say(f"teacher.cpus_per_actor auto -> {actor:g} for {cfg.teacher.pool_size} actor(s) ({why})")
    return cfg.model_copy(update=update)
