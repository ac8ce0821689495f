"""Every ``auto`` that depends on the cluster, resolved in one place.

A config as the user writes it may leave ``cluster.use_gpu``, ``deepspeed.stage``,
``cluster.cpus_per_worker`` and ``teacher.cpus_per_actor`` at ``auto``. :func:`resolve` turns them
into values from a :class:`ClusterFacts` record and says each choice; what comes after it
(``fit_student``, ``score_block``, ``evaluate_model``) takes the resolved config and refuses
``auto``. The rules are pure (:func:`decide_gpu` and :func:`decide_interconnect` here,
``incr_ray.plan.auto_layout`` for the stage,
``incr_ray.generation.resources.cpus_per_bundle`` and ``cpus_per_gpu`` for the CPUs);
:func:`probe_cluster` is the one place that asks Ray for the facts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

from .config import Config, ConfigError, ewc_stage_problem
from .generation.deepspeed_config import resolve_precision
from .generation.resources import AUTO, cpus_per_bundle, cpus_per_gpu
from .modeling import ModelError
from .plan import auto_layout, resolve_shape

# The Ray node label cluster.yaml's GPU workers start with: "efa" when the node found an EFA device
# and NCCL's aws-ofi-nccl plugin, "tcp" otherwise. `cluster.interconnect: auto` reads it.
INTERCONNECT_LABEL = "incr-ray/interconnect"


@dataclass(frozen=True)
class ClusterFacts:
    """What the cluster-dependent settings and checks of a run depend on: the CPUs of each alive
    node, the GPUs of the whole cluster and of each node (``node_gpus``, in ``node_cpus``'s order;
    empty: not known), and whether this driver attached to a cluster that was already running
    (``ray job submit``, ``--address``) rather than starting its own. ``node_interconnect``: each
    node's :data:`INTERCONNECT_LABEL` ("" without one), in the same order."""

    node_cpus: tuple[float, ...]
    gpus: float = 0.0
    attached: bool = False
    node_gpus: tuple[float, ...] = ()
    node_interconnect: tuple[str, ...] = ()

    @property
    def nodes(self) -> int:
        return len(self.node_cpus)


def probe_cluster() -> ClusterFacts:
    """The facts of the Ray cluster this process is connected to."""
    import ray  # here: the rules above import where Ray is absent

    alive = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterFacts(
        node_cpus=tuple(float(n.get("Resources", {}).get("CPU", 0.0)) for n in alive),
        gpus=float(ray.cluster_resources().get("GPU", 0.0)),
        # RAY_ADDRESS: set by `ray job submit` for the job's driver, and by `incr-ray --address`.
        attached=bool(os.environ.get("RAY_ADDRESS")),
        node_gpus=tuple(float(n.get("Resources", {}).get("GPU", 0.0)) for n in alive),
        node_interconnect=tuple((n.get("Labels") or {}).get(INTERCONNECT_LABEL, "") for n in alive),
    )


def decide_gpu(use_gpu, cluster_gpus: float, attached: bool) -> bool:
    """``cluster.use_gpu`` against what the cluster has now.

    ``auto`` means GPUs when the cluster has any. On a cluster this driver attached to (a job, or
    ``--address``) no GPU may only mean none has been started yet — an autoscaling cluster adds GPU
    nodes when asked for them — so there ``auto`` is refused rather than silently training on CPU.
    """
    if use_gpu != AUTO:
        return bool(use_gpu)
    if cluster_gpus > 0:
        return True
    if attached:
        raise ConfigError(
            "cluster.use_gpu is auto but this Ray cluster has no GPU yet (an autoscaling cluster starts "
            "GPU nodes only when asked); set cluster.use_gpu: true to train on GPUs, or false for CPUs"
        )
    return False


def decide_interconnect(setting: str, facts: ClusterFacts) -> tuple[str, str]:
    """``cluster.interconnect`` against the cluster's GPU nodes: ("fast" or "tcp", why).

    ``auto`` is fast only when every alive GPU node carries :data:`INTERCONNECT_LABEL` ``efa``; a
    node without it, or no GPU node up yet to ask (an autoscaling cluster before its first one),
    counts as tcp: the layout chosen then suits a slow network too, at worst a fast one pays for
    an offloaded optimizer it did not need.
    """
    if setting != AUTO:
        return setting, f"cluster.interconnect: {setting}"
    labels = [label for label, gpus in zip(facts.node_interconnect, facts.node_gpus) if gpus > 0]
    if labels and all(label == "efa" for label in labels):
        return "fast", f"every GPU node has EFA ({INTERCONNECT_LABEL}=efa)"
    if labels:
        return "tcp", f"a GPU node has no {INTERCONNECT_LABEL}=efa label"
    return "tcp", "no GPU node is up yet to read its label; set cluster.interconnect: fast for EFA nodes"


def _gpus_per_node(facts: ClusterFacts) -> int | None:
    """The most GPUs on one alive node (a one-node cluster: all of them); None while no GPU node is up."""
    most = max(facts.node_gpus, default=0.0)
    if most > 0:
        return int(most)
    return int(facts.gpus) if facts.nodes == 1 and facts.gpus > 0 else None


def _stage(cfg: Config, on_gpu: bool, facts: ClusterFacts, say: Callable[[str], None]) -> Config:
    if cfg.deepspeed.stage != AUTO:
        return cfg
    # The driver may have no GPU to ask; the workers check bf16 support again on theirs.
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_supported=True)
    shape, gpus_per_node, fabric, note = None, None, None, ""
    if on_gpu and cfg.cluster.workers > 1:  # the plan decides: it needs the model's shape and the network
        try:
            shape = resolve_shape(cfg)
        except ModelError:
            raise ConfigError(
                f"deepspeed.stage auto cannot read the shape of model.base {cfg.model.base!r} to choose a stage "
                "for several GPUs; set deepspeed.stage (incr-ray plan --params N shows which fits)"
            ) from None
        fabric, fabric_why = decide_interconnect(cfg.cluster.interconnect, facts)
        counted = _gpus_per_node(facts)
        gpus_per_node = counted or 1  # no GPU node to count yet: plan for the worst, one worker per node
        if fabric != "fast" and math.ceil(cfg.cluster.workers / gpus_per_node) > 1:
            note = f" [{fabric_why}" + ("" if counted else "; GPUs per node unknown") + "]"
    layout, why = auto_layout(cfg, on_gpu, precision, shape, gpus_per_node, fabric)
    offload = layout.offload_optimizer and not cfg.deepspeed.offload_optimizer
    say(f"deepspeed.stage auto -> ZeRO-{layout.stage}{' with optimizer offload' if offload else ''}: {why}{note}")
    update = {"deepspeed": cfg.deepspeed.model_copy(update={"stage": layout.stage,
                                                            "offload_optimizer": layout.offload_optimizer})}
    if fabric and cfg.cluster.interconnect == AUTO:  # recorded as decided, in run.json too
        update["cluster"] = cfg.cluster.model_copy(update={"interconnect": fabric})
    return cfg.model_copy(update=update)


def _cpus(cfg: Config, on_gpu: bool, facts: ClusterFacts, say: Callable[[str], None]) -> Config:
    """On CPU each of the n workers (or actors) gets the most whole CPUs with which all n place at
    once; training and scoring never run together, so each may take the whole cluster. On GPU
    clusters a training worker (one per GPU) gets its node's CPUs per GPU, the smallest share of any
    GPU node (CPU Adam under ``offload_optimizer`` runs on them), and a scoring actor 1."""
    worker_auto, actor_auto = cfg.cluster.cpus_per_worker == AUTO, cfg.teacher.cpus_per_actor == AUTO
    if not (worker_auto or actor_auto):
        return cfg
    node_cpus = list(facts.node_cpus)
    if on_gpu:
        worker = cpus_per_gpu(node_cpus, list(facts.node_gpus))
        if worker is None:
            worker, worker_why = 1, "no GPU node is up yet to count its CPUs per GPU: set it to theirs"
        else:
            gpu_nodes = [(c, g) for c, g in zip(node_cpus, facts.node_gpus) if g > 0]
            worker_why = "CPUs per GPU on the GPU nodes: " + ", ".join(sorted({f"{c:g}/{g:g}" for c, g in gpu_nodes}))
        actor, actor_why = 1.0, "GPU cluster: the CPUs feed the GPUs"
    else:
        worker = cpus_per_bundle(node_cpus, cfg.cluster.workers)
        actor = float(cpus_per_bundle(node_cpus, cfg.teacher.pool_size))
        worker_why = actor_why = f"{sum(node_cpus):g} CPUs on {len(node_cpus)} node(s)"
    update = {}
    if worker_auto:
        update["cluster"] = cfg.cluster.model_copy(update={"cpus_per_worker": worker})
        say(f"cluster.cpus_per_worker auto -> {worker} for {cfg.cluster.workers} worker(s) ({worker_why})")
    if actor_auto:
        update["teacher"] = cfg.teacher.model_copy(update={"cpus_per_actor": actor})
        say(f"teacher.cpus_per_actor auto -> {actor:g} for {cfg.teacher.pool_size} actor(s) ({actor_why})")
    return cfg.model_copy(update=update)


def resolve(cfg: Config, facts: ClusterFacts, say: Callable[[str], None] | None = None) -> Config:
    """``cfg`` with ``cluster.use_gpu`` a bool, ``deepspeed.stage`` a ZeRO stage and
    ``cluster.cpus_per_worker`` / ``teacher.cpus_per_actor`` numbers, chosen for ``facts``;
    ``say`` hears each choice it made (use_gpu's aside). A resolved config comes back unchanged.
    """
    say = say or (lambda line: None)
    on_gpu = decide_gpu(cfg.cluster.use_gpu, facts.gpus, facts.attached)
    if cfg.cluster.use_gpu != on_gpu:
        cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"use_gpu": on_gpu})})
    cfg = _stage(cfg, on_gpu, facts, say)
    problem = ewc_stage_problem(cfg.method.ewc, cfg.deepspeed.stage)  # auto may have chosen ZeRO-3
    if problem:
        raise ConfigError(f"deepspeed.stage auto chose ZeRO-3, and {problem}")
    return _cpus(cfg, on_gpu, facts, say)
