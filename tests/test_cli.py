"""The command line: exit codes, one-line errors without tracebacks, nothing written on bad input.

Argument, config, model and run-folder errors are found before Ray starts, so they are tested
in-process through :func:`incr_ray.cli.main` (with ``init_ray`` replaced by a tripwire). A few
tests run the real entry point in a subprocess; ``test_cli_console.py`` checks the whole console
output of bad data that reaches Ray.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from incr_ray import cli
from small_run import fake_run


def ray_env() -> dict[str, str]:
    """The environment for a CLI subprocess: Ray on 127.0.0.1, never an outside cluster."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return env


def incr_ray(*args, cwd=None, timeout=240):
    """Run the installed ``incr-ray`` script (``python -m incr_ray.cli`` where it is not installed)."""
    script = Path(sys.executable).with_name("incr-ray")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "incr_ray.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, env=ray_env(), timeout=timeout)


def assert_usage_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("incr-ray: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


class Result:
    """What ``main`` returned and printed, shaped like a CompletedProcess."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    """``run_cli(*args)``: ``incr_ray.cli.main`` in this process, with its exit code and output."""

    def run(*args) -> Result:
        capsys.readouterr()
        try:
            code = cli.main(list(args))
        except SystemExit as exit:  # argparse
            code = exit.code
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command gets as far as starting Ray."""
    import ray

    was_up = ray.is_initialized()

    def tripwire(address):
        pytest.fail("init_ray was called: this error should be reported before Ray starts")

    monkeypatch.setattr(cli, "init_ray", tripwire)
    yield
    if not was_up:
        assert not ray.is_initialized()


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["method.kk=3"], ["unknown key 'kk'", "threshold"]),
        (["method.k=0"], ["method.k"]),
        (["method.threshold=0"], ["method.threshold"]),
        (["method.threshold=1.5"], ["method.threshold"]),
        (["method.threshold=-0.2"], ["method.threshold"]),
        (["method.floor=0.95"], ["floor", "threshold"]),
        (["student.learning_rate=-1"], ["student.learning_rate"]),
        (["student.epochs=-2"], ["student.epochs"]),
        (["model.base=/nonexistent/model"], ["does not exist"]),
    ],
)
def test_bad_config_values(tmp_path, run_cli, no_ray, overrides, needles):
    args = ["train", "--set", f"storage.path={tmp_path}/runs"]
    for o in overrides:
        args += ["--set", o]
    assert_usage_error(run_cli(*args), *needles)
    assert not (tmp_path / "runs" / "incr-run").exists()


def test_bad_config_files(tmp_path, run_cli, no_ray):
    assert_usage_error(run_cli("train", "--config", str(tmp_path / "missing.yaml")), "does not exist")
    bad = write(tmp_path / "bad.yaml", "method:\n  k: [3\n")
    assert_usage_error(run_cli("train", "--config", bad), "not valid YAML")
    unknown = write(tmp_path / "unknown.yaml", "method:\n  kay: 3\n")
    assert_usage_error(run_cli("train", "--config", unknown), "method.kay", "valid keys")
    assert not list(tmp_path.glob("incr-run*"))


def test_not_a_classifier_model(tmp_path, run_cli, no_ray):
    d = tmp_path / "notamodel"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "clip"}')
    proc = run_cli("train", "--set", f"model.base={d}", "--set", f"storage.path={tmp_path}/runs")
    assert_usage_error(proc, "sequence-classification")
    assert not (tmp_path / "runs" / "incr-run").exists()


def test_bad_data_leaves_no_run_folder(tmp_path, tiny_bert, ray_local, run_cli):
    runs = tmp_path / "runs"

    def train(source, *more):
        sets = [f"data.source={source}", *more, f"model.base={tiny_bert}", f"storage.path={runs}"]
        return run_cli("train", *[a for s in sets for a in ("--set", s)])

    assert_usage_error(train(f"{tmp_path}/nope.csv"), "nope.csv")
    one_class = write(tmp_path / "one_class.csv", "text,label\n" + "".join(f"row {i},a\n" for i in range(200)))
    assert_usage_error(train(one_class), "class")
    two_classes = write(tmp_path / "two.csv", "text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(200)))
    assert_usage_error(train(two_classes, "data.eval_fraction=0"), "no holdout", "data.eval_fraction")
    saved = tmp_path / "saved"
    part = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(40)], "label": ["ab"[i % 2] for i in range(40)]})
    datasets.DatasetDict({"train": part, "test": part}).save_to_disk(str(saved))
    assert_usage_error(train(saved, "data.split=validation"), "data.split 'validation'", "(splits: train, test)")
    assert not (runs / "incr-run").exists()


def test_evaluate_and_extend_refuse_before_ray(tmp_path, run_cli, no_ray):
    assert_usage_error(run_cli("evaluate", "--run", str(tmp_path)), "not an incr-ray run folder")
    data = write(tmp_path / "new.csv", "text,label\nx,a\n")
    assert_usage_error(run_cli("extend", "--run", str(tmp_path), "--data", data), "not an incr-ray run folder")
    run = fake_run(tmp_path / "runs" / "incr-run")
    missing = str(tmp_path / "missing.csv")
    assert_usage_error(run_cli("extend", "--run", run, "--data", missing), "--data", "missing.csv", "does not exist")
    assert_usage_error(run_cli("evaluate", "--run", run, "--data", missing), "--data", "missing.csv")
    assert_usage_error(run_cli("extend", "--run", run, "--data", data, "--holdout-fraction", "1.5"),
                       "--holdout-fraction", "not a share in [0, 1)")
    assert sorted(p.name for p in Path(run).iterdir()) == ["run.json"]


def hold_lock(folder: Path) -> str:
    """A .lock in ``folder`` as a live process on this host holds it (this test's own process)."""
    text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": 0.0})
    (folder / ".lock").write_text(text)
    return text


def test_a_run_in_use_is_refused_before_ray(tmp_path, tiny_bert, run_cli, no_ray):
    run = Path(fake_run(tmp_path / "runs" / "incr-run"))
    held = hold_lock(run)
    train = run_cli("train", "--set", f"storage.path={tmp_path}/runs", "--set", f"model.base={tiny_bert}")
    assert_usage_error(train, "is in use by process", str(os.getpid()))
    data = write(tmp_path / "new.csv", "text,label\nx,a\n")
    assert_usage_error(run_cli("extend", "--run", str(run), "--data", data), "is in use by process")
    assert (run / ".lock").read_text() == held  # the holder's lock is left alone
    assert sorted(p.name for p in run.iterdir()) == [".lock", "run.json"]


def test_a_changed_setting_is_refused_before_ray(tmp_path, tiny_bert, run_cli, no_ray):
    run = Path(fake_run(tmp_path / "runs" / "incr-run"))  # run.json: every setting at its default
    sets = ["--set", f"storage.path={tmp_path}/runs", "--set", f"model.base={tiny_bert}"]
    assert_usage_error(run_cli("train", *sets, "--set", "method.threshold=0.8"),
                       "was started with other settings", "method.threshold: 0.9 -> 0.8", "restore them to resume")
    data = write(tmp_path / "new.csv", "text,label\nx,a\n")
    assert_usage_error(run_cli("extend", "--run", str(run), "--data", data, "--set", "method.threshold=0.8"),
                       "was trained with other settings", "an extension may change")
    assert sorted(p.name for p in run.iterdir()) == ["run.json"]  # and the lock was let go


def test_an_mlflow_folder_store_is_refused_before_ray(tmp_path, tiny_bert, run_cli, no_ray, monkeypatch):
    # MLflow's own habit, `./mlruns`: MLflow 3 would refuse it only once the run had started, and
    # the run would then train untracked.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = write(tmp_path / "tracked.yaml", "tracking:\n  backend: mlflow\n  uri: ./mlruns\n")
    proc = run_cli("train", "--config", config, "--set", f"storage.path={tmp_path}/runs",
                   "--set", f"model.base={tiny_bert}")
    assert_usage_error(proc, "tracking.uri './mlruns' is a folder", f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                       "a server (http://", "leave it unset")
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tracked.yaml"]  # no run folder, no mlruns


def test_predict_refuses_non_model(run_cli):
    assert_usage_error(run_cli("predict", "--model", "/nonexistent", "x"), "not a model folder")
    assert_usage_error(run_cli("predict", "--model", "/nonexistent"), "at least one text")


@pytest.mark.slow  # two interpreters importing the package
def test_entry_point_exit_codes(tmp_path, tiny_bert):
    """The installed script: 0 and one line per text on success, 2 and one line on a config error."""
    proc = incr_ray("predict", "--model", tiny_bert, "a nice film", "a bad film")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].split("\t")[0] in {"c0", "c1", "c2"}
    bad = incr_ray("train", "--set", "method.k=0", "--set", f"storage.path={tmp_path}/runs")
    assert_usage_error(bad, "method.k")
    assert bad.stdout == "" and len(bad.stderr.splitlines()) == 1, bad.stderr
