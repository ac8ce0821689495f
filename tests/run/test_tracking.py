"""Experiment tracking without Ray: the pure parts, and the MLflow tracker against a real local
SQLite store, read back with ``MlflowClient``."""

from __future__ import annotations

import json
import os
import sys

import pytest

from incr_ray.config import ConfigError, config_from_dict
from incr_ray.run.folder import Run, RunPaths
from incr_ray.run.manifest import DataInfo, Manifest, load
from incr_ray.run.tracking import (Tracker, artifact_location, check_tracking, default_uri, flat_params,
                                   generation_metrics, mlflow_folder, open_tracker, tracked)

ENTRY = {  # a generation's entry as run.json holds it
    "index": 1, "status": "finished", "rows": 300, "block_rows": 280, "replay_rows": 20, "scoring_seconds": 4.5,
    "eval_seconds": 1.25, "seconds": 40.0, "promoted": True, "model": "gen_001/model",
    "metrics": {"accuracy": 0.75, "macro_f1": 0.7, "nll": 0.6, "ece": 0.05, "n": 100},
    "teacher_on_block": {"accuracy": 0.7, "nll": 0.8, "kept": 0.5, "pushed": 0.4, "floored": 0.1,
                         "target_entropy": 0.3, "rows": 280},
    "continual": {"flip_rate": 0.02, "fix_rate": 0.05},
    "train": {"train_loss": 0.4, "train_seconds": 30.0, "steps": 19, "zero_stage": 2,
              "precision": {"requested": "fp32", "model_weights": "fp32"}},
    "drift": {"2": {"accuracy": 0.6, "rows": 40}},
    "old_new": {"added_by": 1, "old_classes": 1, "new_labels": ["b"], "before": 0, "holdouts": {
        "holdout": {"rows": 10, "accuracy": 0.8, "old_rows": 10, "old_accuracy": 0.8, "new_rows": 0,
                    "old_accuracy_before": 0.9, "forgetting": 0.1, "classes": {"a": {"rows": 10, "correct": 8, "recall": 0.8}}},
        "2": {"rows": 4, "accuracy": 0.5, "old_rows": 2, "old_accuracy": 0.5, "new_rows": 2, "new_accuracy": 0.5,
              "classes": {"a": {"rows": 2, "correct": 1, "recall": 0.5}, "b?x": {"rows": 2, "correct": 1, "recall": 0.5}}}}},
}


def _cfg(tmp_path, **tracking):
    return config_from_dict({"run": {"name": "tracked"}, "storage": {"path": str(tmp_path)},
                             "method": {"k": 2}, "tracking": {"backend": "mlflow", **tracking}})


def _run(cfg, said) -> Run:
    paths = RunPaths(cfg.run_dir)
    os.makedirs(paths.root, exist_ok=True)
    manifest = Manifest(name=cfg.run.name, run_dir=paths.root, created="now", config=cfg.to_dict(),
                        label_names=["a", "b"], data=DataInfo(fingerprint="f", block_sizes=[10, 10], holdout_size=5))
    return Run(cfg=cfg, paths=paths, manifest=manifest, on_gpu=False, say=said.append)


def _client(db):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _train_generation(run: Run, g: int, accuracy: float, losses=(0.9, 0.5)) -> None:
    """What run_generation does around the workers, with rank 0's step logger in place of training."""
    from transformers import TrainerState

    from incr_ray.generation.progress import MlflowStepLogger

    entry = run.manifest.entry(g)
    run.tracker.generation_started(entry, run.manifest.teacher_of(g))
    fields = run.tracker.worker_fields(g)
    logger = MlflowStepLogger(fields["tracking_uri"], fields["tracking_run_id"], g, run.say)
    for step, loss in enumerate(losses, start=1):
        logger.on_log(None, TrainerState(global_step=step), None, logs={"loss": loss, "learning_rate": 1e-3 / step})
    entry.metrics = {"accuracy": accuracy, "nll": 0.5}
    entry.status, entry.model = "finished", f"gen_{g:03d}/model"
    run.tracker.generation_finished(entry)


def test_flat_params_names_every_nested_key():
    params = flat_params({"run": {"name": "x", "seed": 1}, "student": {"lora": {"r": 8, "target_modules": ["q", "v"]},
                                                                        "epochs": 1.5},
                          "tracking": {"uri": None}, "cluster": {"use_gpu": "auto", "workers": 2, "flag": True}})
    assert params == {"run.name": "x", "run.seed": "1", "student.lora.r": "8", "student.lora.target_modules": '["q", "v"]',
                      "student.epochs": "1.5", "tracking.uri": "null", "cluster.use_gpu": "auto",
                      "cluster.workers": "2", "cluster.flag": "true"}
    assert "tracking.backend" in flat_params(config_from_dict({}).to_dict())


def test_generation_metrics_from_a_manifest_entry():
    m = generation_metrics(ENTRY)
    assert m["holdout/accuracy"] == 0.75 and m["holdout/n"] == 100
    assert m["teacher_on_block/kept"] == 0.5 and m["teacher_on_block/rows"] == 280
    assert m["continual/flip_rate"] == 0.02
    assert m["train/train_seconds"] == 30.0 and m["train/steps"] == 19 and m["train/zero_stage"] == 2
    assert not any(k.startswith("train/precision") for k in m)  # not a figure
    assert m["drift/gen_2/accuracy"] == 0.6
    assert m["old_new/holdout/forgetting"] == 0.1 and m["old_new/holdout/old_accuracy_before"] == 0.9
    assert m["old_new/gen_2/new_accuracy"] == 0.5 and m["old_new/gen_2/recall/b_x"] == 0.5  # a legal metric name
    assert m["old_new/holdout/recall/a"] == 0.8 and not any(k.endswith("/classes") for k in m)
    assert m["generation/rows"] == 300 and m["generation/scoring_seconds"] == 4.5 and m["generation/seconds"] == 40.0
    assert m["generation/promoted"] == 1.0
    assert generation_metrics({"index": 0, "status": "running"}) == {}


def test_default_store_is_sqlite_in_the_storage_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict({"storage": {"path": "runs"}, "tracking": {"backend": "mlflow"}})
    uri = default_uri(cfg.storage.path)
    assert uri == f"sqlite:///{tmp_path}/runs/mlflow.db" and uri.startswith("sqlite:////")
    assert artifact_location(uri) == f"{tmp_path}/runs/mlartifacts"
    assert artifact_location("http://mlflow:5000") is None


def test_tracking_settings_that_cannot_work_are_one_line_errors(tmp_path, monkeypatch):
    remote = {"storage": {"path": "s3://bucket/runs"}}
    with pytest.raises(ConfigError, match=r"storage.path 's3://bucket/runs' is remote; set tracking.uri") as err:
        check_tracking(config_from_dict({**remote, "tracking": {"backend": "mlflow"}}))
    assert "\n" not in str(err.value)
    check_tracking(config_from_dict({**remote, "tracking": {"backend": "mlflow", "uri": "http://mlflow:5000"}}))
    with pytest.raises(ConfigError, match="set tracking.uri"):
        check_tracking(config_from_dict({**remote, "tracking": {"backend": "tensorboard"}}))
    check_tracking(config_from_dict({"tracking": {"backend": "tensorboard"}}))  # tensorboardX is installed
    check_tracking(config_from_dict({}))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"tracking.backend wandb needs wandb: pip install wandb"):
        check_tracking(config_from_dict({"tracking": {"backend": "wandb"}}))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"needs mlflow: pip install 'incr-ray\[tracking\]'"):
        check_tracking(config_from_dict({"tracking": {"backend": "mlflow"}}))


@pytest.mark.parametrize("uri, folder", [("./mlruns", "mlruns"), ("mlruns", "mlruns"), ("file:./mlruns", "mlruns"),
                                         ("{tmp}/store", "store"), ("file://{tmp}/store", "store")])
def test_an_mlflow_folder_store_is_refused_naming_its_sqlite_file(tmp_path, monkeypatch, uri, folder):
    # MLflow 3 refuses plain file stores: a folder as tracking.uri would train for minutes untracked.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = uri.format(tmp=tmp_path)
    cfg = config_from_dict({"tracking": {"backend": "mlflow", "uri": uri}})
    with pytest.raises(ConfigError) as err:
        check_tracking(cfg)
    message = str(err.value)
    assert "\n" not in message and f"tracking.uri {uri!r} is a folder" in message
    assert f"set tracking.uri: sqlite:///{tmp_path}/{folder}/mlflow.db, a server (http://" in message
    assert "or leave it unset for <storage.path>/mlflow.db" in message
    assert mlflow_folder(uri) == f"{tmp_path}/{folder}"
    # MLflow's own opt-out opens the folder store again, so it is not refused then.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking(cfg)


@pytest.mark.parametrize("uri", ["sqlite:///runs/mlflow.db", "http://mlflow:5000", "https://mlflow.example.com",
                                 "postgresql://user@db/mlflow", "databricks", "databricks://profile"])
def test_mlflow_stores_that_are_not_folders_pass(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert mlflow_folder(uri) is None
    check_tracking(config_from_dict({"tracking": {"backend": "mlflow", "uri": uri}}))
    # A TensorBoard log folder is a folder by design.
    check_tracking(config_from_dict({"tracking": {"backend": "tensorboard", "uri": "./tb-logs"}}))


def test_a_run_resumed_and_extended_logs_into_one_parent_run(tmp_path, mlflow_db):
    said = []
    cfg = _cfg(tmp_path)  # the default store: <storage.path>/mlflow.db
    run = _run(cfg, said)
    with tracked(run):
        parent = run.manifest.tracking_run_id
        assert parent and load(run.paths.manifest).tracking_run_id == parent  # in run.json at once
        _train_generation(run, 0, accuracy=0.6)
        assert [s for s in said if "warning" in s] == []
    # A second attempt (resume) opens the same parent and adds generation 1.
    with tracked(run):
        assert run.manifest.tracking_run_id == parent
        _train_generation(run, 1, accuracy=0.7, losses=(0.8, 0.6, 0.4))
        run.manifest.final_model, run.manifest.final_generation = "gen_001/model", 1
        run.tracker.run_finished(run.manifest.to_json(), {"report.md": b"# report\n", "generations.png": b"png"})
    # An extension with more cluster workers: the params keep the first attempt's values.
    extended = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"workers": 3})})
    run.cfg = extended
    with tracked(run):
        run.manifest.entry(2).extended, run.manifest.entry(2).source = True, "new.csv"
        run.manifest.entry(2).settings = {"student.schedule": "run"}
        _train_generation(run, 2, accuracy=0.8)

    client = _client(mlflow_db)
    [experiment] = [e for e in client.search_experiments() if e.name == "incr-ray"]
    assert experiment.artifact_location == str(tmp_path / "mlartifacts")
    [parent_run] = client.search_runs([experiment.experiment_id], "attributes.run_name = 'tracked'")
    assert parent_run.info.run_id == parent and parent_run.info.status == "FINISHED"
    assert parent_run.data.params["method.k"] == "2" and parent_run.data.params["tracking.backend"] == "mlflow"
    assert parent_run.data.params["cluster.workers"] == "1"
    assert parent_run.data.tags["incr_ray.run_dir"] == run.paths.root and parent_run.data.tags["final_model"] == "gen_001/model"
    history = client.get_metric_history(parent, "holdout/accuracy")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.6), (1, 0.7), (2, 0.8)]
    assert parent_run.data.metrics["final/accuracy"] == 0.7 and parent_run.data.metrics["final/generation"] == 1
    assert {a.path for a in client.list_artifacts(parent)} == {"report.md", "generations.png"}
    assert (tmp_path / "mlartifacts").is_dir()

    nested = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_gen = {int(r.data.tags["generation"]): r for r in nested}
    assert sorted(by_gen) == [0, 1, 2]
    assert [by_gen[g].info.run_id for g in range(3)] == [run.manifest.entry(g).tracking_run_id for g in range(3)]
    assert by_gen[0].data.tags["teacher"] == "none" and by_gen[1].data.tags["teacher"] == "0"
    assert by_gen[2].data.tags["extended"] == "true" and by_gen[2].data.tags["source"] == "new.csv"
    assert by_gen[2].data.tags["extension.student.schedule"] == "run" and "extension.student.schedule" not in by_gen[1].data.tags
    assert by_gen[1].info.run_name == "gen_001" and by_gen[1].info.status == "FINISHED"
    loss = client.get_metric_history(by_gen[1].info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(loss, key=lambda m: m.step)] == [(1, 0.8), (2, 0.6), (3, 0.4)]
    assert len(client.get_metric_history(by_gen[1].info.run_id, "learning_rate")) == 3
    assert by_gen[1].data.metrics["holdout/accuracy"] == 0.7
    assert said[0].startswith(f"tracking: MLflow run {parent} in sqlite:///")


def test_an_interrupted_generation_continues_its_nested_run(tmp_path, mlflow_db):
    said = []
    run = _run(_cfg(tmp_path, uri=f"sqlite:///{mlflow_db}", experiment="other"), said)
    with pytest.raises(KeyboardInterrupt):
        with tracked(run):
            run.tracker.generation_started(run.manifest.entry(0), None)
            raise KeyboardInterrupt
    client = _client(mlflow_db)
    first = run.manifest.entry(0).tracking_run_id
    assert client.get_run(first).info.status == "FAILED"
    assert client.get_run(run.manifest.tracking_run_id).info.status == "FAILED"
    with tracked(run):
        _train_generation(run, 0, accuracy=0.6)
    assert run.manifest.entry(0).tracking_run_id == first
    assert client.get_run(first).info.status == "FINISHED"
    assert client.get_run(run.manifest.tracking_run_id).info.status == "FINISHED"
    assert client.get_experiment(client.get_run(first).info.experiment_id).name == "other"


def test_an_unusable_store_warns_once_and_the_run_goes_on(tmp_path):
    said = []
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = _run(_cfg(tmp_path, uri=f"sqlite:///{blocker}/mlflow.db"), said)
    with tracked(run) as tracker:
        assert type(tracker) is Tracker  # no tracking
        entry = run.manifest.entry(0)
        run.tracker.generation_started(entry, None)
        assert run.tracker.worker_fields(0) == {}
        run.tracker.generation_finished(entry)
        run.tracker.run_finished(run.manifest.to_json(), {"report.md": b"x"})
    assert len(said) == 1 and said[0].startswith("warning: MLflow tracking is off for this run: could not open")
    assert "training goes on" in said[0] and "\n" not in said[0]
    assert run.manifest.tracking_run_id is None and entry.tracking_run_id is None


def test_a_store_failing_mid_run_warns_once_and_stops_logging(tmp_path, mlflow_db):
    said = []
    run = _run(_cfg(tmp_path, uri=f"sqlite:///{mlflow_db}"), said)
    with tracked(run):
        entry = run.manifest.entry(0)
        run.tracker.generation_started(entry, None)
        _client(mlflow_db).delete_run(entry.tracking_run_id)  # someone deletes the run meanwhile
        entry.metrics, entry.status = {"accuracy": 0.5}, "finished"
        run.tracker.generation_finished(entry)  # logging into a deleted run fails
        run.tracker.generation_started(run.manifest.entry(1), entry)
        assert run.tracker.worker_fields(1) == {}
        run.tracker.run_finished(run.manifest.to_json(), {"report.md": b"x"})
    warnings = [s for s in said if "warning" in s]
    assert len(warnings) == 1 and "MLflow tracking stopped while logging generation 0" in warnings[0]
    assert run.manifest.entry(1).tracking_run_id is None


def test_tensorboard_gives_each_generation_its_folder(tmp_path):
    said = []
    cfg = config_from_dict({"run": {"name": "tb"}, "storage": {"path": str(tmp_path)},
                            "tracking": {"backend": "tensorboard"}})
    tracker = open_tracker(cfg, None, cfg.run_dir, said.append)
    assert tracker.worker_fields(2) == {"tracking_uri": f"{tmp_path}/tb/tensorboard/gen_002"}
    shared = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": str(tmp_path / "tb-logs")})})
    assert open_tracker(shared, None, cfg.run_dir, said.append).worker_fields(0) == {
        "tracking_uri": f"{tmp_path}/tb-logs/tb/gen_000"}
    assert json.dumps(said).count("tensorboard --logdir") == 2
