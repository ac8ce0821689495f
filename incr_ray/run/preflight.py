"""The checks before a run, apart from its folder: what would otherwise fail late, found first.

Most are pure functions of the config and a :class:`~incr_ray.resolve.ClusterFacts` record
(:func:`preflight`: ``auto`` resolved, precision, model, storage, tracking; :func:`check_head` once
the data's labels are known; :func:`shared_paths`, which local paths every node must see). Two ask
Ray: ``incr_ray.resolve.probe_cluster`` for the facts, and :func:`check_shared_paths`, which runs a
task on every node of a multi-node cluster to look for those paths.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..config import Config, ConfigError
from ..generation.deepspeed_config import precision_problem, resolve_precision
from ..lora import check_lora
from ..modeling import ModelError, check_classifier, head_mismatch, resolve_model_path
from ..plan import resolve_shape
from ..plan.recommend import ensemble_memory_problem, plan_teacher
from ..resolve import ClusterFacts, resolve
from ..storage import absolute, check_writable, is_remote, list_files, read_bytes
from .tracking import check_tracking


def check_model_and_storage(cfg: Config) -> str:
    """Checks that need no Ray and would otherwise fail late: the base model is a classifier, the
    storage folder takes files, the tracking backend can work. Returns the base model's path (or hub name)."""
    check_tracking(cfg)
    base = resolve_model_path(cfg.model.base)
    if not is_remote(base):
        check_classifier(base, cfg.model.trust_remote_code)
        if cfg.student.lora.r:  # the adapters' targets exist in this architecture
            check_lora(cfg.student.lora, base, cfg.model.trust_remote_code)
    check_writable(absolute(cfg.storage.path))
    return base


def check_precision(cfg: Config) -> None:
    """``cfg`` resolved; the workers check bf16 support again on their GPUs."""
    on_gpu = cfg.cluster.use_gpu
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_supported=True)
    problem = precision_problem(precision, cfg.deepspeed.stage, on_gpu, bf16_supported=True)
    if problem:
        raise ConfigError(problem)


def check_ensemble_memory(cfg: Config) -> None:
    """``cfg`` resolved: on GPUs, the ``teacher.ensemble`` members must fit one scoring actor
    (:func:`incr_ray.plan.recommend.ensemble_memory_problem`). A base model whose shape cannot be
    read here (a hub name offline) is not judged: the plan could not either."""
    t = cfg.teacher
    if t.ensemble < 2 or not cfg.cluster.use_gpu or t.gpus_per_actor <= 0:
        return
    try:
        shape = resolve_shape(cfg)
    except (ModelError, ConfigError):
        return
    problem = ensemble_memory_problem(cfg, plan_teacher(cfg, shape, on_gpu=True))
    if problem:
        raise ConfigError(problem)


def preflight(cfg: Config, facts: ClusterFacts, say: Callable[[str], None] | None = None) -> tuple[Config, str]:
    """(``cfg`` resolved for ``facts``, the base model's path) once every check that needs neither
    the data nor the nodes' files has passed; ``say`` hears each ``auto`` choice."""
    cfg = resolve(cfg, facts, say)
    check_precision(cfg)
    check_ensemble_memory(cfg)
    return cfg, check_model_and_storage(cfg)


def _remote_config(base_model: str, into: str, trust_remote_code: bool) -> str:
    """``into`` with the ``config.json`` of the remote model folder ``base_model`` (and, with
    ``trust_remote_code``, the folder's own ``.py`` files, which its config may name): enough for
    ``AutoConfig``, without the weights."""
    names = ["config.json"]
    if trust_remote_code:
        names += [n for n in list_files(base_model) if n.endswith(".py")]
    for name in names:
        try:
            data = read_bytes(base_model.rstrip("/") + "/" + name)
        except OSError as err:  # missing, no permission, unreachable
            raise ConfigError(f"model.base {base_model!r}: cannot read its {name} ({err}); check the URI and "
                              "that this machine can read it") from None
        Path(into, name).write_bytes(data)
    return into


def check_head(cfg: Config, base_model: str, num_labels: int) -> None:
    """ZeRO-3 partitions the classification head, so a head for another number of labels cannot be
    resized: refused here, not hung in the workers' collectives. A remote base (s3://) is judged by
    its ``config.json``, read from storage."""
    if cfg.deepspeed.stage != 3:
        return
    trust = cfg.model.trust_remote_code
    if is_remote(base_model):
        with tempfile.TemporaryDirectory(prefix="incr-ray-head-") as folder:
            head = head_mismatch(_remote_config(base_model, folder, trust), num_labels, trust)
    else:
        head = head_mismatch(base_model, num_labels, trust)
    if head is not None:
        raise ConfigError(
            f"model.base {cfg.model.base!r} has a classification head for {head} labels but the data has "
            f"{num_labels}; ZeRO-3 cannot resize a partitioned head: use deepspeed.stage 2 for this run, "
            "or a base model without a classification head"
        )


def shared_paths(cfg: Config, base_model: str, facts: ClusterFacts) -> dict[str, str]:
    """The local folders every node must see, by the setting that names them: none on one node,
    and none that is a storage URI (each node reads those itself)."""
    if facts.nodes < 2:
        return {}
    out = {}
    storage = absolute(cfg.storage.path)
    if not is_remote(storage):
        out["storage.path"] = storage
    if not is_remote(base_model) and os.path.exists(base_model):
        out["model.base"] = base_model
    return out


def on_every_node(fn, *args) -> list[tuple[str, Any]]:
    """(node address, ``fn(*args)``) from a task on every alive node of the cluster."""
    task = ray.remote(num_cpus=0)(fn)  # 0 CPUs: a head that advertises none still runs it
    nodes = [n for n in ray.nodes() if n["Alive"]]
    results = ray.get([
        task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
        for n in nodes
    ])
    return [(n["NodeManagerAddress"], r) for n, r in zip(nodes, results)]


def _missing_here(paths: list[str]) -> list[str]:
    return [p for p in paths if not os.path.exists(p)]


def unreachable_on_nodes(paths: list[str]) -> list[tuple[str, str]]:
    """(node address, path) for every local path an alive node of the cluster cannot see."""
    return [(node, p) for node, missing in on_every_node(_missing_here, paths) for p in missing]


def check_shared_paths(cfg: Config, base_model: str, facts: ClusterFacts) -> None:
    """On a cluster of several nodes, :func:`shared_paths` must be visible on all of them: a path
    only the driver's node sees would fail deep inside a generation, on another node."""
    folders = shared_paths(cfg, base_model, facts)
    if not folders:
        return
    # In storage a file written now, not just the folder: each node may have its own folder of that name.
    probes = {setting: (os.path.join(folder, f".incr-ray-probe-{os.getpid()}-{time.time_ns()}")
                        if setting == "storage.path" else os.path.join(folder, "config.json"))
              for setting, folder in folders.items()}
    if "storage.path" in probes:
        Path(probes["storage.path"]).touch()
    try:
        missing = unreachable_on_nodes(list(probes.values()))
    finally:
        if "storage.path" in probes:
            os.unlink(probes["storage.path"])
    if missing:
        node, path = missing[0]
        setting = next(s for s, p in probes.items() if p == path)
        shown = cfg.storage.path if setting == "storage.path" else cfg.model.base
        raise ConfigError(
            f"{setting} {shown!r} is not visible on node {node} ({len(missing)} node/path pair(s) in all); "
            "on a multi-node cluster put it on storage every node reaches (an NFS mount on all nodes, or s3://)"
        )
