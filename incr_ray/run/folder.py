"""A run folder opened for work: its layout, its lock, and the :class:`Run` the loop works on.

:func:`open_run` (train) and :func:`open_finished` (extend) are context managers that hold the
run's lock for as long as the caller works on it; bad input fails before the folder is created.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.data.expressions import col

from ..config import Config, ConfigError, config_from_dict
from ..data import HOLDOUT, SplitData, split_data
from ..generation.deepspeed_config import precision_problem, resolve_precision
from ..generation.resources import with_cpus
from ..lora import check_lora
from ..modeling import ModelError, check_classifier, head_mismatch, resolve_model_path
from ..plan import auto_stage, resolve_shape
from ..storage import (StorageError, absolute, check_writable, exists, is_remote, remove_tree, rename_tree,
                       write_json_atomic)
from .manifest import EXTENSION_SETTINGS, DataInfo, Manifest, RunError, check_compatible, load, now
from .tracking import Tracker, check_tracking


@dataclass(frozen=True)
class RunPaths:
    """Where each artefact of a run lives (see "The run folder" in the docs)."""

    root: str

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def manifest(self) -> str:
        return self.join("run.json")

    @property
    def split(self) -> str:
        return self.join("split")

    def model(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "model")

    def adapter(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "adapter")

    def targets(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "targets")

    def own_holdout(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "own_holdout")

    def progress(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "progress.json")

    def predictions(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "holdout_predictions.parquet")

    @property
    def ray_train(self) -> str:
        return self.join("_ray_train")


# ---------------------------------------------------------------------------------------------
# The lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One process at a time per run folder. A lock whose owner died (same host) is taken over."""

    def __init__(self, run_dir: str):
        self.path = run_dir.rstrip("/") + "/.lock"
        self.held = False

    def acquire(self) -> "RunLock":
        if is_remote(self.path):
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(Path(self.path).read_text())
                except (OSError, ValueError):
                    owner = {}
                same_host = owner.get("host") == socket.gethostname()
                if same_host and not _pid_alive(int(owner.get("pid", -1))):
                    os.unlink(self.path)  # stale: its process is gone
                    continue
                raise StorageError(
                    f"run folder {os.path.dirname(self.path)!r} is in use by process "
                    f"{owner.get('pid')} on {owner.get('host')}; wait for it to finish, or if that "
                    f"process is gone delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise StorageError(f"could not take the lock {self.path}; delete it if no run is active")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()



# ---------------------------------------------------------------------------------------------
# The run


def decide_gpu(use_gpu, cluster_gpus: float, attached: bool) -> bool:
    """``cluster.use_gpu`` against what the cluster has now.

    ``auto`` means GPUs when the cluster has any. On a cluster this driver attached to (a job, or
    ``--address``) no GPU may only mean none has been started yet — an autoscaling cluster adds GPU
    nodes when asked for them — so there ``auto`` is refused rather than silently training on CPU.
    """
    if use_gpu != "auto":
        return bool(use_gpu)
    if cluster_gpus > 0:
        return True
    if attached:
        raise ConfigError(
            "cluster.use_gpu is auto but this Ray cluster has no GPU yet (an autoscaling cluster starts "
            "GPU nodes only when asked); set cluster.use_gpu: true to train on GPUs, or false for CPUs"
        )
    return False


def cluster_has_gpu(cfg: Config) -> bool:
    # RAY_ADDRESS: set by `ray job submit` for the job's driver, and by `incr-ray --address`.
    return decide_gpu(cfg.cluster.use_gpu, ray.cluster_resources().get("GPU", 0),
                      attached=bool(os.environ.get("RAY_ADDRESS")))


@dataclass
class Run:
    """A run folder opened for work: config, paths, manifest and where the console goes."""

    cfg: Config
    paths: RunPaths
    manifest: Manifest
    on_gpu: bool
    say: Callable[[str], None] = print
    tracker: Tracker = field(default_factory=Tracker)  # set by tracking.tracked() while a command works
    _holdout: Any = field(default=None, repr=False)

    @property
    def label_names(self) -> list[str]:
        return self.manifest.label_names

    @property
    def base_model(self) -> str:
        return self.manifest.base_model

    def save(self) -> None:
        write_json_atomic(self.paths.manifest, self.manifest.to_json())

    def rel(self, path: str) -> str:
        return path if is_remote(path) else os.path.relpath(path, self.paths.root)

    def split_dataset(self):
        return ray.data.read_parquet(self.paths.split)

    def block(self, g: int):
        """Training block ``g`` of the split, read once (it is counted, then scored)."""
        return self.split_dataset().filter(expr=col("block") == g).materialize()

    def holdout(self):
        """The holdout rows, read once per run and kept in the object store (every generation
        evaluates on them)."""
        if self._holdout is None:
            self._holdout = self.block(HOLDOUT)
        return self._holdout


def with_stage(cfg: Config, on_gpu: bool, say=print) -> Config:
    """``cfg`` with ``deepspeed.stage: auto`` resolved to a number (and the choice said)."""
    if cfg.deepspeed.stage != "auto":
        return cfg
    # The driver may have no GPU to ask; the workers check bf16 support again on theirs.
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_supported=True)
    shape = None
    if on_gpu and cfg.cluster.workers > 1:  # the plan decides: it needs the model's shape
        try:
            shape = resolve_shape(cfg)
        except ModelError:
            raise ConfigError(
                f"deepspeed.stage auto cannot read the shape of model.base {cfg.model.base!r} to choose a stage "
                "for several GPUs; set deepspeed.stage (incr-ray plan --params N shows which fits)"
            ) from None
    stage, why = auto_stage(cfg, on_gpu, precision, shape)
    say(f"deepspeed.stage auto -> ZeRO-{stage}: {why}")
    return cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"stage": stage})})


def resolve_auto(cfg: Config, on_gpu: bool, say=print) -> Config:
    """``cfg`` with every ``auto`` that depends on the cluster resolved (ZeRO stage, CPUs per worker
    and per scoring actor), each choice said: what a run (or an extension) trains with."""
    return with_cpus(with_stage(cfg, on_gpu, say), on_gpu, say=say)


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


def _check_precision(cfg: Config, on_gpu: bool) -> None:
    """``cfg`` has its ZeRO stage resolved; the workers check bf16 support again on their GPUs."""
    precision = resolve_precision(cfg.deepspeed.precision, on_gpu, bf16_supported=True)
    problem = precision_problem(precision, cfg.deepspeed.stage, on_gpu, bf16_supported=True)
    if problem:
        raise ConfigError(problem)


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


def _check_shared_paths(cfg: Config, base_model: str, storage: str) -> None:
    """On a cluster of several nodes, local paths must be visible on all of them: a path only the
    driver's node sees would fail deep inside a generation, on another node."""
    if len([n for n in ray.nodes() if n["Alive"]]) < 2:
        return
    probe = None
    local = []
    if not is_remote(storage):
        # A file written here, not just the folder: each node may have its own folder of that name.
        probe = os.path.join(storage, f".incr-ray-probe-{os.getpid()}-{time.time_ns()}")
        Path(probe).touch()
        local.append(probe)
    if not is_remote(base_model) and os.path.exists(base_model):
        local.append(os.path.join(base_model, "config.json"))
    try:
        missing = unreachable_on_nodes(local)
    finally:
        if probe:
            os.unlink(probe)
    if missing:
        node, path = missing[0]
        what = "storage.path" if path == probe else "model.base"
        shown = cfg.storage.path if path == probe else cfg.model.base
        raise ConfigError(
            f"{what} {shown!r} is not visible on node {node} ({len(missing)} node/path pair(s) in all); "
            "on a multi-node cluster put it on storage every node reaches (an NFS mount on all nodes, or s3://)"
        )


def _check_head(cfg: Config, base_model: str, num_labels: int) -> None:
    if cfg.deepspeed.stage != 3 or is_remote(base_model):
        return
    head = head_mismatch(base_model, num_labels, cfg.model.trust_remote_code)
    if head is not None:
        raise ConfigError(
            f"model.base {cfg.model.base!r} has a classification head for {head} labels but the data has "
            f"{num_labels}; ZeRO-3 cannot resize a partitioned head: use deepspeed.stage 2 for this run, "
            "or a base model without a classification head"
        )


def _write_split(split: SplitData, paths: RunPaths) -> None:
    """Persist the split (temp folder, then rename) so resumes never recompute it."""
    tmp = paths.split + ".tmp"
    remove_tree(tmp)
    split.dataset.write_parquet(tmp)
    rename_tree(tmp, paths.split)


def _new_manifest(cfg: Config, paths: RunPaths, base_model: str, split: SplitData) -> Manifest:
    return Manifest(
        name=cfg.run.name,
        run_dir=paths.root,
        created=now(),
        config=cfg.to_dict(),
        label_names=list(split.label_names),
        data=DataInfo(fingerprint=split.fingerprint, block_sizes=list(split.block_sizes),
                      holdout_size=int(split.holdout_size)),
        base_model=base_model,
    )


@contextmanager
def open_run(cfg: Config, say=print) -> Iterator[Run]:
    """Open (or create) the run folder for ``cfg`` and hold its lock while the caller works.

    Bad input fails before the run folder is created; an existing folder is locked before it is
    read, so a second process on the same run is refused instead of racing the first.
    """
    on_gpu = cluster_has_gpu(cfg)
    settings = cfg  # as the user wrote it (stage auto stays auto in run.json)
    resolved: list[str] = []  # said once the data has passed: bad data stays a short error
    cfg = resolve_auto(cfg, on_gpu, resolved.append)
    _check_precision(cfg, on_gpu)
    base_model = check_model_and_storage(cfg)
    _check_shared_paths(cfg, base_model, absolute(cfg.storage.path))
    paths = RunPaths(absolute(cfg.run_dir))
    lock = RunLock(paths.root).acquire() if exists(paths.root) else None
    try:
        manifest = load(paths.manifest) if exists(paths.manifest) else None
        if manifest is not None:
            check_compatible(manifest, cfg)
            manifest.config = settings.to_dict()  # resource settings may change between attempts
            manifest.base_model = base_model
        else:
            say(f"reading and splitting data ({cfg.data.source}) into k={cfg.method.k} blocks + holdout")
            split = split_data(cfg)  # validates the data: errors surface before anything is written
            if split.holdout_size == 0:
                raise RunError(
                    "no holdout: data.eval_fraction is 0 and data.eval_path is unset, but every generation "
                    "is evaluated on a holdout; set data.eval_fraction (e.g. 0.1) or data.eval_path"
                )
            _check_head(cfg, base_model, len(split.label_names))
            if lock is None:
                if not is_remote(paths.root):
                    os.makedirs(paths.root, exist_ok=True)
                lock = RunLock(paths.root).acquire()
            _write_split(split, paths)
            manifest = _new_manifest(settings, paths, base_model, split)
        for line in resolved:
            say(line)
        run = Run(cfg=cfg, paths=paths, manifest=manifest, on_gpu=on_gpu, say=say)
        run.save()
        yield run
    finally:
        if lock is not None:
            lock.release()


def read_manifest(run_dir: str) -> tuple[RunPaths, Manifest]:
    """The paths and manifest of an existing run folder; a folder that is not a run is a RunError."""
    paths = RunPaths(absolute(run_dir))
    if not exists(paths.manifest):
        raise RunError(f"{run_dir!r} is not an incr-ray run folder (no run.json); pass --run STORAGE/RUN_NAME")
    return paths, load(paths.manifest)


@contextmanager
def open_finished(run_dir: str, overrides: list[str], say=print) -> Iterator[Run]:
    """Open a finished run (or one whose extension was interrupted) to extend it."""
    paths, manifest = read_manifest(run_dir)
    if manifest.status not in ("finished", "extending"):
        raise RunError(
            f"run {manifest.name!r} is not finished; finish it first with the same `incr-ray train` command"
        )
    cfg = config_from_dict(manifest.config, overrides)
    # Resource settings may change, and how the new generation trains (EXTENSION_SETTINGS).
    check_compatible(manifest, cfg, may_change=EXTENSION_SETTINGS)
    check_tracking(cfg)
    on_gpu = cluster_has_gpu(cfg)
    with RunLock(paths.root):
        yield Run(cfg=resolve_auto(cfg, on_gpu, say), paths=paths, manifest=manifest, on_gpu=on_gpu, say=say)
