"""The comparison's trials on Ray Tune: a function trainable that runs one run to the end
(:func:`incr_ray.run.loop.run_generations`, so each trial still scores with Ray Data and trains with
Ray Train), as many at once as the cluster holds.

- Each trial's run folder is the record: a trial whose folder says ``finished`` is read back, not
  run again; any other runs (an interrupted one resumes where it stopped). So running the same
  command again finishes what a crash, a failed trial or a Ctrl-C left.
- A trial that fails (its one-line error, an OOM, a bug) is reported with its error; the others
  finish. Tune never retries it: the next ``compare`` does.
- The trainable reserves no CPU of its own (it only waits on the run's Ray Data and Ray Train work,
  which reserve theirs), so a trial never holds back the resources its own run needs;
  ``--max-concurrent`` (default :func:`.plan.runs_at_once`) is what keeps runs from crowding out
  each other.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

from ..config import Config, ConfigError, config_from_dict
from ..storage import absolute, exists, read_json, write_bytes_atomic, write_json_atomic
from .plan import ComparePlan, Trial
from .report import plot_png, render_markdown, summarize


STOPPED = "stopped before it finished; run the same command again to resume it"


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user can fix (one line each, no traceback): what ``incr-ray`` itself reports so."""
    from ..config import ConfigError
    from ..data import DataError
    from ..modeling import ModelError
    from ..run.manifest import RunError
    from ..storage import StorageError

    return (ConfigError, DataError, ModelError, RunError, StorageError)


def _one_line(err: BaseException) -> str:
    """The error's class and its message's last line (a Ray task error: those of what it wraps)."""
    while getattr(err, "cause", None) is not None:
        err = err.cause
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"


def read_trial(run_dir: str) -> dict[str, Any] | None:
    """A finished trial's result from its run folder; None when it has not finished."""
    from ..run.report import final_entry

    manifest_path = run_dir.rstrip("/") + "/run.json"
    if not exists(manifest_path):
        return None
    manifest = read_json(manifest_path)
    if manifest.get("status") != "finished":
        return None
    final = final_entry(manifest)
    if final is None:
        return None
    cost = sum(float(g.get("seconds") or 0.0) for g in manifest["generations"] if g.get("status") == "finished")
    return {"status": "finished", "metrics": {k: final["metrics"][k] for k in ("accuracy", "macro_f1", "nll", "ece")},
            "cost_seconds": cost, "final_generation": final["index"],
            "holdout_size": manifest["data"]["holdout_size"], "run_dir": manifest["run_dir"]}


def _run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One run, to the end: its result, or its one-line error when it is one a user can fix."""
    from ..run.loop import run_generations

    cfg = config_from_dict(spec["config"])
    try:
        run_generations(cfg, say=lambda line: print(f"[{cfg.run.name}] {line}", flush=True))
    except user_errors() as err:
        return {"status": "failed", "error": str(err).splitlines()[0]}
    return read_trial(absolute(cfg.run_dir)) or {"status": "failed", "error": "the run did not finish"}


def run_trial(config: dict[str, Any]) -> None:
    """The Tune trainable. Tune schedules a trial into a placement group that captures its child
    tasks, where the run's Ray Data tasks would wait forever for CPUs the group does not hold; so the
    run goes to a task outside any placement group (reserving no CPU), and this waits for it."""
    import ray
    from ray import tune
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    outside = PlacementGroupSchedulingStrategy(placement_group=None)
    task = ray.remote(num_cpus=0, max_retries=0)(_run_one).options(scheduling_strategy=outside)
    tune.report(ray.get(task.remote(config["spec"])))


class _Progress:
    """A line per trial as it starts, finishes or fails (Tune's own tables are off)."""

    def __new__(cls, say: Callable[[str], None], total: int):
        from ray.tune import Callback

        class Progress(Callback):
            def __init__(self):
                self.done = 0
                self.started: dict[str, float] = {}

            def _name(self, trial) -> str:
                return trial.config["spec"]["config"]["run"]["name"]

            def on_trial_start(self, iteration, trials, trial, **info):
                self.started[self._name(trial)] = time.monotonic()
                say(f"[{self._name(trial)}] started")

            def on_trial_result(self, iteration, trials, trial, result, **info):
                self.done += 1
                name = self._name(trial)
                took = time.monotonic() - self.started.get(name, time.monotonic())
                if result.get("status") == "finished":
                    m = result["metrics"]
                    say(f"[{name}] finished in {took:.0f} s ({self.done}/{total}): accuracy {m['accuracy']:.4f}  "
                        f"NLL {m['nll']:.4f}  ECE {m['ece']:.4f}")
                else:
                    say(f"[{name}] failed ({self.done}/{total}): {result.get('error')}")

            def on_trial_error(self, iteration, trials, trial, **info):
                self.done += 1
                say(f"[{self._name(trial)}] failed ({self.done}/{total}): {_trial_error(trial)}")

        return Progress()


def _trial_error(trial) -> str:
    err = getattr(trial, "error_file", None)
    text = ""
    if err and os.path.exists(err):
        lines = [line for line in open(err, encoding="utf-8", errors="replace").read().splitlines() if line.strip()]
        text = lines[-1].strip() if lines else ""
    return text or "the trial failed; see Ray's logs"


def refuse_unrunnable(plan: ComparePlan) -> ComparePlan:
    """Each variant's run checked as ``incr-ray train`` checks one before Ray starts (its model is a
    classifier, its storage takes files): a variant that fails gets its one line on all its trials,
    the others go on."""
    from dataclasses import replace

    from ..run.preflight import check_model_and_storage

    errors: dict[str, str] = {}
    for t in plan.trials:
        if t.error or t.variant in errors:
            continue
        try:
            check_model_and_storage(t.config)
        except user_errors() as err:
            errors[t.variant] = str(err).splitlines()[0]
        else:
            errors[t.variant] = ""
    plan.trials = [replace(t, config=None, error=errors[t.variant]) if errors.get(t.variant) else t
                   for t in plan.trials]
    return plan


def pending_trials(plan: ComparePlan) -> tuple[dict[str, dict[str, Any]], list[Trial]]:
    """The results the trial folders already hold, and the trials still to run (the variants the
    config refused are results too: their error)."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[Trial] = []
    for t in plan.trials:
        if t.error:
            results[t.name] = {"status": "failed", "error": t.error}
            continue
        run_dir = absolute(t.config.run_dir)
        if exists(run_dir.rstrip("/") + "/run.json"):
            from ..run.manifest import check_compatible, load

            try:  # a folder left by a comparison with other settings must not pass for this one's
                check_compatible(load(run_dir.rstrip("/") + "/run.json"), t.config)
            except user_errors() as err:
                results[t.name] = {"status": "failed", "error": str(err).splitlines()[0]}
                continue
        done = read_trial(run_dir)
        if done is not None:
            results[t.name] = done
        else:
            todo.append(t)
    return results, todo


def tune_trials(todo: list[Trial], folder: str, max_concurrent: int, say: Callable[[str], None],
                trainable=run_trial) -> dict[str, dict[str, Any]]:
    """Run ``todo`` as Tune trials, ``max_concurrent`` at once; each one's result or error by name."""
    from ray import tune

    # A trial must see the same relative paths as this process (Tune would chdir into its own folder).
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # no experiment banner: a line per trial (_Progress) says enough
    specs = [{"name": t.name, "config": t.config.to_dict()} for t in todo]
    tuner = tune.Tuner(
        # Tune refuses a trial that reserves nothing; one byte of memory is nothing that matters.
        tune.with_resources(trainable, {"cpu": 0, "memory": 1}),
        param_space={"spec": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=False),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=absolute(folder.rstrip("/") + "/.tune"), verbose=0,
                                  callbacks=[_Progress(say, len(todo))],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    out: dict[str, dict[str, Any]] = {}
    for result in grid:
        name = result.config["spec"]["name"]
        if result.error is not None:
            out[name] = {"status": "failed", "error": _one_line(result.error)}
        elif "status" not in (result.metrics or {}):  # stopped before it reported (Ctrl-C, a lost node)
            out[name] = {"status": "stopped", "error": STOPPED}
        else:
            m = result.metrics
            out[name] = {k: m[k] for k in ("status", "error", "metrics", "cost_seconds", "final_generation",
                                           "holdout_size", "run_dir") if k in m}
    return out


def write_report(plan: ComparePlan, results: dict[str, dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """compare.{json,md,png} in the comparison's folder; returns compare.json's content."""
    summary = summarize(plan, results) | extra
    root = plan.folder.rstrip("/")
    write_json_atomic(root + "/compare.json", summary)
    write_bytes_atomic(root + "/compare.md", render_markdown(summary).encode())
    png = plot_png(summary)
    if png is not None:
        write_bytes_atomic(root + "/compare.png", png)
    return summary


def default_concurrency(cfg: Config) -> int:
    import ray

    from ..resolve import probe_cluster, resolve
    from .plan import runs_at_once

    return runs_at_once(resolve(cfg, probe_cluster()), ray.cluster_resources())


def _mlflow_parent(cfg: Config, folder: str, previous: dict[str, Any] | None, say) -> tuple[Any, str | None]:
    """tracking.backend mlflow: the comparison's parent run (the one compare.json names, else a new
    one); each trial's run nests under it. A store that cannot be opened is said once."""
    if cfg.tracking.backend != "mlflow":
        return None, None
    from ..run.tracking import find_experiment, mlflow_uri, quiet_mlflow_store
    from ..run.tracking_figures import short_error

    uri = mlflow_uri(cfg)
    try:
        from mlflow.tracking import MlflowClient

        quiet_mlflow_store()
        client = MlflowClient(tracking_uri=uri)
        run_id = (previous or {}).get("tracking_run_id")
        if not run_id:
            experiment_id = find_experiment(client, cfg.tracking.experiment, uri)
            run_id = client.create_run(experiment_id, run_name=f"compare {cfg.run.name}",
                                       tags={"incr_ray.compare": folder}).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        say(f"tracking: MLflow run {run_id} in {uri}; each trial's run nests under it")
        return client, run_id
    except Exception as err:  # noqa: BLE001 - tracking must never stop the comparison
        say(f"warning: MLflow tracking is off for this comparison ({short_error(err)})")
        return None, None


def _mlflow_close(client, run_id: str, summary: dict[str, Any], folder: str, ok: bool, say) -> None:
    from ..run.tracking_figures import short_error

    try:
        metrics = {f"{v}/{m}_diff": d["mean"] for v, ds in summary["differences"].items()
                   for m, d in ds.items() if d is not None}
        metrics |= {f"{v}/{m}": ci["mean"] for v, cs in summary["means"].items() for m, ci in cs.items() if ci}
        stamp = int(time.time() * 1000)
        from mlflow.entities import Metric

        client.log_batch(run_id, metrics=[Metric(k.replace("=", "_"), float(x), stamp, 0) for k, x in metrics.items()])
        for name in ("compare.md", "compare.json", "compare.png"):
            path = folder.rstrip("/") + "/" + name
            if os.path.exists(path):
                client.log_artifact(run_id, path)
        client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")
    except Exception as err:  # noqa: BLE001
        say(f"warning: MLflow tracking of the comparison stopped ({short_error(err)})")


def run_compare(raw: dict[str, Any], sets: list[str], seeds: int, against: str | None, grid: list[str],
                max_concurrent: int | None, say: Callable[[str], None] = print,
                start_ray: Callable[[], None] | None = None) -> dict[str, Any]:
    """The whole command: plan (checked before Ray), read back what finished, run the rest on Tune,
    write compare.{json,md,png}. Ray is started (``start_ray``) only when a trial must run."""
    from .plan import plan_compare

    base = config_from_dict(raw, sets)
    folder = absolute(base.run_dir)
    if exists(folder.rstrip("/") + "/run.json"):
        raise ConfigError(f"{folder} is a run folder, not a comparison's; set run.name to a new name for the "
                          "comparison (--set run.name=...)")
    previous = read_json(folder + "/compare.json") if exists(folder + "/compare.json") else None
    client, parent = _mlflow_parent(base, folder, previous, say)
    trial_sets = [f"storage.path={folder}"]
    if parent:
        from ..run.tracking import mlflow_uri

        trial_sets += [f"tracking.uri={mlflow_uri(base)}", f"tracking.parent_run={parent}"]
    plan = refuse_unrunnable(plan_compare(raw, sets, seeds, against, grid, trial_sets=trial_sets))
    results, todo = pending_trials(plan)
    say(f"compare: {len(plan.variants)} variant(s) × {len(plan.seeds)} seeds in {folder}: "
        f"{len(plan.trials) - len(todo)} trial(s) done or refused, {len(todo)} to run")
    ok = False
    try:
        if todo:
            if start_ray is not None:
                start_ray()
            at_once = max_concurrent or default_concurrency(todo[0].config)
            say(f"compare: up to {at_once} trial(s) at once (--max-concurrent); watch one with "
                f"`incr-ray status --run {folder}/{todo[0].name}`")
            results |= tune_trials(todo, folder, at_once, say)
        ok = True
    finally:
        summary = write_report(plan, results, {"tracking_run_id": parent} if parent else {})
        if client is not None:
            _mlflow_close(client, parent, summary, folder, ok, say)
    say(f"compare: wrote {folder}/compare.md")
    return summary
