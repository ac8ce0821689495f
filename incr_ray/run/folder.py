"""A run folder opened for work: its layout, its lock, and the :class:`Run` the loop works on.

:func:`open_run` (train) and :func:`open_finished` (extend) are context managers that hold the
run's lock for as long as the caller works on it; bad input fails before the folder is created
(the checks live in :mod:`.preflight`). The CLI takes the lock earlier, before Ray starts, with
:func:`claim_run` / :func:`claim_finished`, and hands it down. :func:`fork_run` starts a run folder
from another run's finished generations.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.data
from ray.data.expressions import col

from ..config import Config, config_from_dict
from ..data import HOLDOUT, SplitData, split_data
from ..resolve import probe_cluster, resolve
from ..storage import (StorageError, absolute, drop_staged, exists, is_remote, remove_tree, rename_tree,
                       write_bytes_atomic, write_json_atomic)
from .manifest import EXTENSION_SETTINGS, DataInfo, Manifest, RunError, check_compatible, load, now
from .model_card import write_model_card
from .preflight import check_ensemble_memory, check_head, check_precision, check_shared_paths, on_every_node, preflight
from .preflight import unreachable_on_nodes  # noqa: F401 - its home before preflight.py; callers import it here
from .report import plot_png, render_report
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

    def fisher(self, g: int) -> str:  # method.ewc: the model's diagonal Fisher information and weights
        return self.join(f"gen_{g:03d}", "fisher.safetensors")

    def initial_model(self, g: int) -> str:  # extend --allow-new-labels: the teacher with its head grown
        return self.join(f"gen_{g:03d}", "initial_model")

    def targets(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "targets")

    def own_holdout(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "own_holdout")

    def progress(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "progress.json")

    def predictions(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "holdout_predictions.parquet")

    def suspects(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "suspects.parquet")

    def memory(self, g: int) -> str:  # replay.per_class: the exemplars the student replays
        return self.join(f"gen_{g:03d}", "memory.parquet")

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


def _given(lock: RunLock | None, paths: RunPaths) -> RunLock | None:
    """``lock``, checked to be the lock of ``paths``' folder."""
    if lock is not None and lock.path != RunLock(paths.root).path:
        raise ValueError(f"the lock {lock.path} is not the lock of run folder {paths.root}")
    return lock


@contextmanager
def claim_run(cfg: Config) -> Iterator[RunLock | None]:
    """Before Ray starts: lock ``cfg``'s run folder if it exists, and refuse a config its run.json was
    not started with. Yields the lock for :func:`open_run` to work under; None for a new run, whose
    folder is made (and locked) only once its data has passed the checks."""
    paths = RunPaths(absolute(cfg.run_dir))
    if not exists(paths.root):
        yield None
        return
    with RunLock(paths.root) as lock:
        if exists(paths.manifest):
            check_compatible(load(paths.manifest), cfg)
        yield lock


@contextmanager
def open_run(cfg: Config, say=print, lock: RunLock | None = None) -> Iterator[Run]:
    """Open (or create) the run folder for ``cfg`` and hold its lock while the caller works.

    Bad input fails before the run folder is created; an existing folder is locked before it is
    read, so a second process on the same run is refused instead of racing the first. ``lock``: the
    folder's lock as :func:`claim_run` took it (this process's, held by the caller until it is done).
    """
    facts = probe_cluster()
    settings = cfg  # as the user wrote it (stage auto stays auto in run.json)
    resolved: list[str] = []  # said once the data has passed: bad data stays a short error
    cfg, base_model = preflight(cfg, facts, resolved.append)
    check_shared_paths(cfg, base_model, facts)
    paths = RunPaths(absolute(cfg.run_dir))
    lock = _given(lock, paths)
    own = RunLock(paths.root).acquire() if lock is None and exists(paths.root) else None
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
            check_head(cfg, base_model, len(split.label_names))
            if lock is None and own is None:
                if not is_remote(paths.root):
                    os.makedirs(paths.root, exist_ok=True)
                own = RunLock(paths.root).acquire()
            _write_split(split, paths)
            manifest = _new_manifest(settings, paths, base_model, split)
        for line in resolved:
            say(line)
        run = Run(cfg=cfg, paths=paths, manifest=manifest, on_gpu=cfg.cluster.use_gpu, say=say)
        run.save()
        yield run
    finally:
        if own is not None:
            own.release()


def read_manifest(run_dir: str) -> tuple[RunPaths, Manifest]:
    """The paths and manifest of an existing run folder; a folder that is not a run is a RunError."""
    paths = _run_folder(run_dir)
    return paths, load(paths.manifest)


def _run_folder(run_dir: str) -> RunPaths:
    paths = RunPaths(absolute(run_dir))
    if not exists(paths.manifest):
        raise RunError(f"{run_dir!r} is not an incr-ray run folder (no run.json); pass --run STORAGE/RUN_NAME")
    return paths


def _extension_config(manifest: Manifest, overrides: list[str]) -> Config:
    """The config an extension of ``manifest``'s run trains with, checked (no Ray)."""
    if manifest.status not in ("finished", "extending"):
        raise RunError(
            f"run {manifest.name!r} is not finished; finish it first with the same `incr-ray train` command"
        )
    cfg = config_from_dict(manifest.config, overrides)
    # Resource settings may change, and how the new generation trains (EXTENSION_SETTINGS).
    check_compatible(manifest, cfg, may_change=EXTENSION_SETTINGS)
    check_tracking(cfg)
    return cfg


@contextmanager
def claim_finished(run_dir: str, overrides: list[str]) -> Iterator[RunLock]:
    """Before Ray starts: lock a finished run's folder and refuse an extension its settings forbid.
    Yields the lock for :func:`open_finished` to work under."""
    paths = _run_folder(run_dir)  # a folder that is no run gets no .lock
    with RunLock(paths.root) as lock:
        _extension_config(load(paths.manifest), overrides)
        yield lock


@contextmanager
def open_finished(run_dir: str, overrides: list[str], say=print, lock: RunLock | None = None) -> Iterator[Run]:
    """Open a finished run (or one whose extension was interrupted) to extend it; ``lock`` as
    :func:`claim_finished` took it, or None to take it here."""
    paths = _run_folder(run_dir)
    with nullcontext() if _given(lock, paths) else RunLock(paths.root):  # a given lock stays its holder's
        manifest = load(paths.manifest)
        cfg = resolve(_extension_config(manifest, overrides), probe_cluster(), say)
        check_precision(cfg)
        check_ensemble_memory(cfg)
        yield Run(cfg=cfg, paths=paths, manifest=manifest, on_gpu=cfg.cluster.use_gpu, say=say)


def fork_run(source_dir: str, cfg: Config, generations: int | None = None) -> Manifest:
    """A new run folder for ``cfg``, a copy of the run at ``source_dir`` under ``cfg``'s name and
    settings: the whole run as it stands (``generations`` None: a finished run to extend in another
    way), or its split and first ``generations`` generations, running again (``incr-ray train``
    trains the rest of its k). What the copy trains next follows ``cfg``; the generations it holds
    stay as they were trained, and ``forked_from`` names where they came from. Local folders only;
    the folder must not exist yet."""
    source, dest = RunPaths(absolute(source_dir)), RunPaths(absolute(cfg.run_dir))
    remote = next((p for p in (source.root, dest.root) if is_remote(p)), None)
    if remote:
        raise RunError(f"fork_run copies local run folders only, not {remote}")
    if exists(dest.root):
        raise RunError(f"{dest.root} exists already; fork into a new run.name, or delete it first")
    manifest = load(source.manifest).forked(cfg.run.name, dest.root, cfg.to_dict(), generations)
    kept = {f"gen_{e.index:03d}" for e in manifest.generations}

    def left_out(folder: str, names: list[str]) -> set[str]:
        if folder != source.root:
            return set()
        gens = {n for n in names if n.startswith("gen_") and n not in kept}
        reports = {"report.md", "report.json", "generations.png"} if generations is not None else set()
        return gens | reports | {"run.json", ".lock", "_ray_train", "forked_from"}

    shutil.copytree(source.root, dest.root, ignore=left_out)
    Path(dest.join("forked_from")).write_text(source.root + "\n")
    write_json_atomic(dest.manifest, manifest.to_json())
    return manifest


def finish_run(run: Run) -> None:
    """Close a run whose generations are trained: status finished, the final model named, every
    model card and the report (re)written, the tracker told."""
    if is_remote(run.paths.root):  # models staged from s3:// (teachers, student inits) on any node
        models = [run.paths.join(e.model) for e in run.manifest.generations if e.model]
        on_every_node(drop_staged, models)
    m = run.manifest
    final = m.teacher_of(len(m.generations))  # the last promoted generation
    m.status = "finished"
    m.final_model, m.final_generation = final.model, final.index
    run.save()
    # Every card again: the final one now says so, one that was final before an extension no
    # longer does, and a run folder from before model cards gets them.
    for e in m.finished_generations():
        if e.model and e.metrics:
            write_model_card(run.paths.model(e.index), m, e.index)
    md, js = render_report(run.manifest.to_json())
    files = {"report.md": md.encode(), "report.json": js.encode(), "generations.png": plot_png(run.manifest.to_json())}
    for name, data in files.items():
        write_bytes_atomic(run.paths.join(name), data)
    run.tracker.run_finished(run.manifest.to_json(), files)
