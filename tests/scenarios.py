"""The suite's scenario runs: each is one real run, made once per session by a fixture in
conftest.py, that many small tests then read (its folder, its console, its MLflow store).

- R1 ``reference_run`` (in-process, the session's Ray): k=2 on a saved ``datasets`` folder with
  every lever that must stay deterministic on (validation slice, calibration, teacher annealing,
  the run-long schedule, replay, the generation gate, retention, EWC, an ensemble teacher of 2, MLflow),
  then one ``evaluate``.
- R2 ``crash_run`` (the CLI in subprocesses): R1's config under another name, killed after
  generation 0 and resumed; it must end with R1's weights byte for byte.
- R3 (tests/run/test_faults_e2e.py), R4 (tests/test_multinode_e2e.py) and R5
  (tests/test_job_submit_e2e.py, an extension of a copy of R2's run) live in their modules.

A fit costs ~30 s here, so a behaviour is checked on one of these runs, not with a run of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import datasets
import numpy as np

from incr_ray.config import config_from_dict
from incr_ray.data.synthetic import synthetic_rows

CLASSES = ["calm", "storm", "drizzle"]  # ClassLabel ids in this order, on purpose not sorted
TRAIN_ROWS, TEST_ROWS = 800, 150


def saved_dataset(folder: Path) -> str:
    """A ``datasets`` DatasetDict on disk: train and test splits, text ``sentence``, ClassLabel ``weather``."""
    features = datasets.Features({"sentence": datasets.Value("string"), "weather": datasets.ClassLabel(names=CLASSES)})

    def part(first: int, n: int) -> datasets.Dataset:
        texts, labels = synthetic_rows(np.arange(first, first + n), seed=7, classes=len(CLASSES))
        return datasets.Dataset.from_dict({"sentence": texts, "weather": [int(x) for x in labels]}, features=features)

    datasets.DatasetDict({"train": part(0, TRAIN_ROWS), "test": part(10_000, TEST_ROWS)}).save_to_disk(str(folder))
    return str(folder)


def reference_settings(storage: Path, data: str, base_model: str, name: str) -> dict:
    """R1's config as a user writes it (R2 runs it through the CLI from a YAML file)."""
    return {
        "run": {"name": name, "seed": 3},
        "storage": {"path": str(storage)},
        "data": {"source": data, "text_column": "sentence", "label_column": "weather", "eval_split": "test"},
        "model": {"base": base_model, "max_length": 24},
        "method": {"k": 2, "threshold": 0.9, "validation_fraction": 0.2, "calibrate": True, "anneal": True,
                   "keep_best": True, "suspect_below": 0.3, "ewc": 10.0, "ewc_rows": 64},
        "student": {"epochs": 2, "min_steps": 0, "learning_rate": 1e-2, "batch_size": 16, "schedule": "run",
                    "warmup_ratio": 0.2},
        "replay": {"fraction": 0.5},
        "eval": {"retention_rows": 100},
        "deepspeed": {"stage": 2},
        # Pinned, not auto: the in-process run (a 2-CPU Ray) and the CLI's (the machine's CPUs) must
        # train with the same threads to give the same weights.
        "cluster": {"workers": 1, "cpus_per_worker": 2},
        # Two generations teach (the mean of their softmaxes) once two exist: R5's extension.
        "teacher": {"batch_size": 128, "pool_size": 1, "cpus_per_actor": 2, "ensemble": 2},
        "tracking": {"backend": "mlflow"},
    }


def reference_config(storage: Path, data: str, base_model: str, name: str = "reference"):
    return config_from_dict(reference_settings(storage, data, base_model, name))


def cli_env() -> dict[str, str]:
    """A CLI subprocess's environment: Ray on 127.0.0.1, never an outside cluster."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def cli(*args: str) -> subprocess.Popen:
    """``python -m incr_ray.cli ARGS`` in its own process group (so a test can SIGKILL all of it)."""
    return subprocess.Popen([sys.executable, "-m", "incr_ray.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=cli_env(), start_new_session=True)


def cli_run(*args: str, timeout: float = 600) -> tuple[int, str]:
    proc = cli(*args)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, out


def read_until(proc: subprocess.Popen, prefix: str, timeout: float, while_waiting=None) -> list[str]:
    """The lines ``proc`` printed up to the first that starts with ``prefix``; ``while_waiting()``
    is called once per line until it returns True. Kills the process group after ``timeout``."""
    watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    seen: list[str] = []
    done_waiting = while_waiting is None
    try:
        for line in proc.stdout:
            seen.append(line)
            if not done_waiting:
                done_waiting = bool(while_waiting())
            if line.startswith(prefix):
                return seen
    finally:
        watchdog.cancel()
    raise AssertionError(f"no line starting {prefix!r}: " + "".join(seen)[-3000:])


def wait_for(check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    return None


def check_tracking(db: Path, manifest: dict, name: str) -> None:
    """A run's MLflow record, read back from its SQLite store: one parent run with the config as
    params and the report as artifacts, one nested run per generation with rank 0's per-step loss."""
    import pytest
    from mlflow.tracking import MlflowClient

    parent = manifest["tracking_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert run.data.params["method.k"] == "2" and run.data.params["deepspeed.stage"] == "2"
    assert run.data.params["tracking.backend"] == "mlflow" and run.data.params["replay.fraction"] == "0.5"
    final = manifest["generations"][manifest["final_generation"]]["metrics"]
    assert run.data.metrics["final/accuracy"] == pytest.approx(final["accuracy"])
    assert {a.path for a in client.list_artifacts(parent)} == {"report.md", "report.json", "generations.png"}
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_gen = {int(r.data.tags["generation"]): r for r in nested}
    assert sorted(by_gen) == [0, 1]
    for g, entry in enumerate(manifest["generations"]):
        r = by_gen[g]
        assert r.info.run_id == entry["tracking_run_id"] and r.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        # Logged by rank 0 alone: each logging step once, up to the generation's last step.
        assert len(steps) > 1 and sorted(steps) == sorted(set(steps)), steps
        assert max(steps) <= entry["train"]["steps"]
        assert len(client.get_metric_history(r.info.run_id, "learning_rate")) == len(steps)
        assert r.data.metrics["holdout/accuracy"] == pytest.approx(entry["metrics"]["accuracy"])
        assert r.data.metrics["generation/rows"] == entry["rows"]
    assert by_gen[1].data.metrics["teacher_on_block/kept"] == pytest.approx(manifest["generations"][1]["teacher_on_block"]["kept"])
    assert by_gen[1].data.metrics["suspects/rows"] == manifest["generations"][1]["suspects"]["rows"]
