"""incr-ray compare's trials on the session's Ray: Tune runs what is pending as many at once as it
is told, a trial that raises is reported with its last line while the others finish, and a trial
folder that finished is read back instead of run. The trainable here stands in for a run (a real
trial is a fit, ~30 s; tests/test_job_submit_e2e.py runs real ones through `ray job submit`)."""

from __future__ import annotations

import json

from incr_ray.compare.plan import plan_compare
from incr_ray.compare.trials import STOPPED, pending_trials, read_trial, tune_trials


def _finished_run(folder, accuracy: float, config: dict) -> None:
    """What a finished run leaves for compare to read: run.json with its config and final metrics."""
    from incr_ray.run.manifest import MANIFEST_VERSION

    folder.mkdir(parents=True)
    gen = {"index": 0, "status": "finished", "seconds": 12.5, "model": "gen_000/model",
           "metrics": {"accuracy": accuracy, "macro_f1": 0.5, "nll": 0.9, "ece": 0.1}}
    (folder / "run.json").write_text(json.dumps({
        "version": MANIFEST_VERSION, "name": folder.name, "run_dir": str(folder), "status": "finished",
        "created": "now", "config": config, "label_names": ["a", "b"], "generations": [gen],
        "data": {"holdout_size": 60, "block_sizes": [240], "fingerprint": "f"}}))


def stand_in_run(config):
    """Writes a finished run folder as a run would; the learning rate 0.5 plays a bug (an exception),
    0.25 a user error (a one-line failure), 0.125 a trial stopped before it reported."""
    from pathlib import Path

    from ray import tune

    cfg = config["spec"]["config"]
    lr = cfg["student"]["learning_rate"]
    if lr == 0.5:
        raise RuntimeError("CUDA out of memory (stand-in)\nsecond line")
    if lr == 0.25:
        tune.report({"status": "failed", "error": "DataError: the data file is empty"})
        return
    if lr == 0.125:  # ends without a word, as a trial Tune stops (Ctrl-C, a lost node) does
        return
    folder = Path(cfg["storage"]["path"]) / cfg["run"]["name"]
    _finished_run(folder, 0.5 + cfg["run"]["seed"] / 100, cfg)
    tune.report(read_trial(str(folder)))


def test_tune_runs_the_pending_trials_and_reports_each_failure_alone(ray_local, tmp_path):
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's workers cannot import a test module
    raw = {"run": {"name": "cmp", "seed": 0}, "storage": {"path": str(tmp_path)}, "method": {"k": 2},
           "student": {"learning_rate": 0.1}}
    plan = plan_compare(raw, [], 2, None, ["student.learning_rate=0.5,0.25,0.125"])
    _finished_run(tmp_path / "cmp" / "config-s0", 0.7, plan.trials[0].config.to_dict())  # by an earlier call
    results, todo = pending_trials(plan)
    assert list(results) == ["config-s0"] and results["config-s0"]["metrics"]["accuracy"] == 0.7
    assert [t.name for t in todo] == ["config-s1", "student.learning_rate=0.5-s0", "student.learning_rate=0.5-s1",
                                      "student.learning_rate=0.25-s0", "student.learning_rate=0.25-s1",
                                      "student.learning_rate=0.125-s0", "student.learning_rate=0.125-s1"]
    lines = []
    out = tune_trials(todo, plan.folder, 2, lines.append, trainable=stand_in_run)
    assert out["config-s1"]["status"] == "finished" and out["config-s1"]["metrics"]["accuracy"] == 0.51
    assert out["student.learning_rate=0.5-s0"] == {"status": "failed", "error": "RuntimeError: second line"}
    assert out["student.learning_rate=0.25-s1"] == {"status": "failed", "error": "DataError: the data file is empty"}
    assert out["student.learning_rate=0.125-s0"] == {"status": "stopped", "error": STOPPED}
    assert "[config-s1] started" in lines
    assert any(line.startswith("[student.learning_rate=0.5-s1] failed (") for line in lines), lines
    # Next call: the finished ones are read back, the failed ones are pending again.
    results, todo = pending_trials(plan)
    assert sorted(results) == ["config-s0", "config-s1"] and len(todo) == 6


def test_a_trial_folder_run_with_other_settings_is_not_read_back(tmp_path):
    """The config changed since the last compare into this folder: its trial folder is reported
    (the settings that differ), never passed off as this comparison's result."""
    raw = {"run": {"name": "cmp", "seed": 0}, "storage": {"path": str(tmp_path)}, "method": {"k": 2}}
    plan = plan_compare(raw, [], 2, None, [])
    old = plan_compare(raw, ["method.threshold=0.8"], 2, None, [])
    _finished_run(tmp_path / "cmp" / "config-s0", 0.7, old.trials[0].config.to_dict())
    results, todo = pending_trials(plan)
    assert [t.name for t in todo] == ["config-s1"]
    assert results["config-s0"]["status"] == "failed"
    assert "method.threshold: 0.8 -> 0.9" in results["config-s0"]["error"]
