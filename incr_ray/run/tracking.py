"""Experiment tracking of a run (the ``tracking`` section): MLflow runs, or the Hugging Face Trainer's
own TensorBoard and W&B integrations for the per-step figures.

MLflow: one parent run per incr-ray run — its id in ``run.json``, so a resumed or extended run logs
into the same one — with the resolved config as params, one point per generation of the holdout
metrics, the final model's metrics, and the report and plot as artifacts. Each generation gets a
nested run (its id in the generation's entry) with what ``run.json`` records for it; its rank-0
training worker adds the per-step loss and learning rate
(:class:`incr_ray.generation.progress.MlflowStepLogger`). Every call names its run through an
explicit ``MlflowClient``, never MLflow's process-wide active run.

Settings that cannot work (a missing package, a folder as MLflow store) are refused before any
compute (:func:`check_tracking`). A tracking failure during the run never stops training: the first
one is said once, and tracking is off for the rest of the command.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

from ..config import Config, ConfigError
from ..storage import absolute, is_remote
from .tracking_figures import final_metrics, flat_params, generation_metrics, generation_tags, short_error

SQLITE_FILE = "mlflow.db"
ARTIFACTS_FOLDER = "mlartifacts"
TENSORBOARD_FOLDER = "tensorboard"
INSTALL = {
    "mlflow": "pip install 'incr-ray[tracking]'",
    "tensorboard": "pip install tensorboardX (or tensorboard)",
    "wandb": "pip install wandb",
}
# MLflow's limit: params per log_batch call.
PARAMS_PER_BATCH = 100


# ---------------------------------------------------------------------------------------------
# Settings: where the figures go, checked before any compute


def default_uri(storage_path: str) -> str:
    """The embedded store: a SQLite file in the storage folder (MLflow 3 keeps its plain file store
    behind a flag, and a database needs no server)."""
    return f"sqlite:///{absolute(storage_path).rstrip('/')}/{SQLITE_FILE}"


def mlflow_uri(cfg: Config) -> str:
    return cfg.tracking.uri or default_uri(cfg.storage.path)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a SQLite store go beside its file; otherwise MLflow would put them in ``./mlruns``
    of whatever folder the command ran in. A server decides for itself (None)."""
    if not uri.startswith("sqlite:///"):
        return None
    return os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")) or ".", ARTIFACTS_FOLDER)


def tensorboard_dir(cfg: Config, run_dir: str) -> str:
    """``<run folder>/tensorboard``, or ``<tracking.uri>/<run.name>`` (one folder holds many runs)."""
    if cfg.tracking.uri:
        return absolute(cfg.tracking.uri).rstrip("/") + "/" + cfg.run.name
    return run_dir.rstrip("/") + "/" + TENSORBOARD_FOLDER


# Tracking URIs MLflow takes without a scheme (a Databricks workspace, a Unity Catalog).
MLFLOW_NAMED_STORES = ("databricks", "databricks-uc", "uc")


def mlflow_folder(uri: str) -> str | None:
    """The local folder a tracking URI names as a plain file store (``./mlruns``, ``/data/mlruns``,
    ``file:///data/mlruns``), as an absolute path; None for a database, a server or a named store.
    MLflow's rule: no scheme (or a Windows drive letter) or ``file:``."""
    if uri in MLFLOW_NAMED_STORES:
        return None
    parsed = urlparse(uri)
    scheme = "" if len(parsed.scheme) == 1 else parsed.scheme.lower()
    if scheme not in ("", "file"):
        return None
    return absolute(parsed.path if scheme == "file" else uri)


def _file_store_allowed() -> bool:
    """MLflow's own opt-out of the file store's refusal, read as MLflow reads it."""
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def check_tracking(cfg: Config) -> None:
    """The tracking settings can work: the backend's package is here, an MLflow store is not a plain
    folder (MLflow 3 refuses those unless ``MLFLOW_ALLOW_FILE_STORE`` is set), and the default store
    or log folder is local. One line naming the fix otherwise."""
    t = cfg.tracking
    if t.backend == "none":
        return
    needs = {"mlflow": ("mlflow",), "wandb": ("wandb",)}.get(t.backend, ())
    if t.backend == "mlflow" and mlflow_uri(cfg).startswith("sqlite:"):
        needs += ("sqlalchemy", "alembic")
    if t.backend == "tensorboard":
        if not (_installed("tensorboardX") or _installed("tensorboard")):
            raise ConfigError(f"tracking.backend tensorboard needs TensorBoard's writer: {INSTALL['tensorboard']}")
    elif not _installed(*needs):
        missing = [m for m in needs if not _installed(m)]
        raise ConfigError(f"tracking.backend {t.backend} needs {', '.join(missing)}: {INSTALL[t.backend]}, "
                          "or set tracking.backend: none")
    folder = mlflow_folder(t.uri) if t.backend == "mlflow" and t.uri else None
    if folder is not None and not _file_store_allowed():
        # MLflow 3 opens a folder store only behind a flag; found here, not minutes into training.
        raise ConfigError(f"tracking.uri {t.uri!r} is a folder, and MLflow 3 no longer opens folder stores; "
                          f"set tracking.uri: {default_uri(folder)}, a server (http://host:5000), "
                          "or leave it unset for <storage.path>/mlflow.db")
    if t.backend in ("mlflow", "tensorboard") and not t.uri and is_remote(cfg.storage.path):
        what = ("a local SQLite file" if t.backend == "mlflow" else "a local folder")
        example = ("sqlite:////mnt/nfs/mlflow.db or http://mlflow-server:5000" if t.backend == "mlflow"
                   else "/mnt/nfs/tensorboard")
        raise ConfigError(f"tracking.backend {t.backend} writes to {what} by default, but storage.path "
                          f"{cfg.storage.path!r} is remote; set tracking.uri (e.g. {example})")


# ---------------------------------------------------------------------------------------------
# The trackers the generation loop calls


class Tracker:
    """No tracking (``tracking.backend: none``, and W&B, whose figures come from the workers alone)."""

    def worker_fields(self, generation: int) -> dict[str, str]:
        """What the training workers need (``StudentRequest.tracking_uri`` / ``tracking_run_id``)."""
        return {}

    def generation_started(self, entry, teacher) -> None:
        pass

    def generation_finished(self, entry) -> None:
        pass

    def run_finished(self, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
        pass

    def close(self, ok: bool) -> None:
        pass


class TensorBoardTracker(Tracker):
    """The workers' Hugging Face TensorBoard callback writes ``<log folder>/gen_NNN``."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir

    def worker_fields(self, generation: int) -> dict[str, str]:
        return {"tracking_uri": f"{self.log_dir}/gen_{generation:03d}"}


class MlflowTracker(Tracker):
    """One parent MLflow run per incr-ray run, one nested run per generation."""

    def __init__(self, client, uri: str, experiment_id: str, parent_id: str, say: Callable[[str], None]):
        self.client, self.uri, self.experiment_id, self.parent_id, self.say = client, uri, experiment_id, parent_id, say
        self.running: set[str] = set()  # runs this command set RUNNING, closed by close()
        self._nested: str | None = None  # the generation in progress: its run, for the workers

    def _safely(self, what: str, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Call MLflow; the first failure is said once and turns tracking off (training goes on)."""
        if self.client is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never fail training
            self.client = None
            self.say(f"warning: MLflow tracking stopped while {what} ({short_error(err)}); training goes on "
                     "without it")
            return None

    def _log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(k, v, stamp, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # MLflow takes at most 1,000 metrics per call
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def _set_running(self, run_id: str) -> None:
        if run_id not in self.running:
            self.client.update_run(run_id, status="RUNNING")
            self.running.add(run_id)

    def worker_fields(self, generation: int) -> dict[str, str]:
        return {"tracking_uri": self.uri, "tracking_run_id": self._nested} if self.client and self._nested else {}

    def generation_started(self, entry, teacher) -> None:
        def start() -> None:
            self._set_running(self.parent_id)
            run_id = entry.tracking_run_id
            if run_id and not self._is_ours(run_id):
                run_id = None
            if run_id:  # an earlier attempt's nested run: continue it
                self._set_running(run_id)
            else:
                tags = generation_tags(entry.model_dump(mode="json"), teacher.index if teacher else None,
                                        self.parent_id)
                run_id = self.client.create_run(self.experiment_id, run_name=f"gen_{entry.index:03d}",
                                                tags=tags).info.run_id
                self.running.add(run_id)
                entry.tracking_run_id = run_id
            self._nested = run_id

        self._nested = None
        self._safely(f"opening generation {entry.index}'s run", start)

    def _is_ours(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:  # another store (tracking.uri changed): start a new run
            return False
        return run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active"

    def generation_finished(self, entry) -> None:
        if not entry.tracking_run_id or entry.tracking_run_id != self._nested:
            return
        figures = generation_metrics(entry.model_dump(mode="json", exclude_none=True))

        def finish() -> None:
            self._log(entry.tracking_run_id, figures, step=0)
            self._log(self.parent_id, {k: v for k, v in figures.items() if k.startswith("holdout/")}, step=entry.index)
            self.client.set_terminated(entry.tracking_run_id, "FINISHED")
            self.running.discard(entry.tracking_run_id)

        self._safely(f"logging generation {entry.index}", finish)
        self._nested = None

    def run_finished(self, manifest: dict[str, Any], files: dict[str, bytes]) -> None:
        def finish() -> None:
            final = final_metrics(manifest)
            if final:
                self._log(self.parent_id, final, step=int(final["final/generation"]))
            with tempfile.TemporaryDirectory(prefix="incr-ray-artifacts-") as folder:
                for name, data in files.items():
                    with open(os.path.join(folder, name), "wb") as f:
                        f.write(data)
                self.client.log_artifacts(self.parent_id, folder)
            if manifest.get("final_model"):
                self.client.set_tag(self.parent_id, "final_model", manifest["final_model"])

        self._safely("logging the report", finish)

    def close(self, ok: bool) -> None:
        def close() -> None:
            for run_id in sorted(self.running - {self.parent_id}):  # a generation that did not finish
                self.client.set_terminated(run_id, "FAILED")
            if self.parent_id in self.running:
                self.client.set_terminated(self.parent_id, "FINISHED" if ok else "FAILED")
            self.running.clear()

        self._safely("closing its runs", close)


def find_experiment(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    if experiment.lifecycle_stage != "active":
        raise RuntimeError(f"experiment {name!r} is deleted in this store; restore it or choose another "
                           "tracking.experiment")
    return experiment.experiment_id


def quiet_mlflow_store() -> None:
    """MLflow announces the tables it creates in a new store at INFO; our own line says enough."""
    import logging

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def open_mlflow(cfg: Config, manifest, say: Callable[[str], None]) -> Tracker:
    """The parent run of ``manifest`` (the one run.json names, else a new one with the config as
    params); a store that cannot be opened is said once and the run goes on untracked."""
    uri = mlflow_uri(cfg)
    try:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        quiet_mlflow_store()
        client = MlflowClient(tracking_uri=uri)
        experiment_id = find_experiment(client, cfg.tracking.experiment, uri)
        tracker = MlflowTracker(client, uri, experiment_id, manifest.tracking_run_id or "", say)
        if not (manifest.tracking_run_id and tracker._is_ours(manifest.tracking_run_id)):
            tags = {"incr_ray.run_dir": manifest.run_dir}
            if cfg.tracking.parent_run:  # a trial of `incr-ray compare`
                tags["mlflow.parentRunId"] = cfg.tracking.parent_run
            run = client.create_run(experiment_id, run_name=manifest.name, tags=tags)
            tracker.parent_id = manifest.tracking_run_id = run.info.run_id
            tracker.running.add(run.info.run_id)
        # Params are write-once in MLflow: a resumed run adds the keys it lacks (settings a resume
        # may change, such as cluster.workers, keep the first attempt's value there).
        logged = client.get_run(tracker.parent_id).data.params
        params = [Param(k, v) for k, v in flat_params(cfg.to_dict()).items() if k not in logged]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(tracker.parent_id, params=params[i:i + PARAMS_PER_BATCH])
    except Exception as err:  # noqa: BLE001 - tracking must never fail training
        say(f"warning: MLflow tracking is off for this run: could not open {uri} ({short_error(err)}); "
            "training goes on without it")
        return Tracker()
    say(f"tracking: MLflow run {tracker.parent_id} in {uri} (experiment {cfg.tracking.experiment!r})")
    return tracker


def open_tracker(cfg: Config, manifest, run_dir: str, say: Callable[[str], None]) -> Tracker:
    backend = cfg.tracking.backend
    if backend == "mlflow":
        return open_mlflow(cfg, manifest, say)
    if backend == "tensorboard":
        log_dir = tensorboard_dir(cfg, run_dir)
        say(f"tracking: TensorBoard logs in {log_dir} (tensorboard --logdir {log_dir})")
        return TensorBoardTracker(log_dir)
    return Tracker()  # none; wandb: the workers' Hugging Face callback does it all


@contextmanager
def tracked(run) -> Iterator[Tracker]:
    """Open the run's tracker for as long as the caller works on ``run`` (a :class:`~incr_ray.run.folder.Run`);
    its parent run id goes into run.json."""
    before = run.manifest.tracking_run_id
    run.tracker = open_tracker(run.cfg, run.manifest, run.paths.root, run.say)
    if run.manifest.tracking_run_id != before:
        run.save()
    ok = False
    try:
        yield run.tracker
        ok = True
    finally:
        run.tracker.close(ok)
        run.tracker = Tracker()
