"""The command line: exit codes, one-line errors without tracebacks, nothing written on bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def incr_ray(*args, cwd=None, timeout=240):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "incr_ray.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )


def assert_usage_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("incr-ray: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (["method.kk=3"], ["unknown key 'kk'", "threshold"]),
        (["method.k=1"], ["method.k"]),
        (["method.threshold=0"], ["method.threshold"]),
        (["method.threshold=1.5"], ["method.threshold"]),
        (["method.threshold=-0.2"], ["method.threshold"]),
        (["method.floor=0.95"], ["floor", "threshold"]),
        (["student.learning_rate=-1"], ["student.learning_rate"]),
        (["student.epochs=-2"], ["student.epochs"]),
        (["model.base=/nonexistent/model"], ["does not exist"]),
    ],
)
def test_bad_config_values(tmp_path, overrides, needles):
    args = ["train", "--set", f"storage.path={tmp_path}/runs"]
    for o in overrides:
        args += ["--set", o]
    proc = incr_ray(*args)
    assert_usage_error(proc, *needles)
    assert not (tmp_path / "runs" / "incr-run").exists()


def test_bad_config_files(tmp_path):
    assert_usage_error(incr_ray("train", "--config", str(tmp_path / "missing.yaml")), "does not exist")
    bad = write(tmp_path / "bad.yaml", "method:\n  k: [3\n")
    assert_usage_error(incr_ray("train", "--config", bad), "not valid YAML")
    unknown = write(tmp_path / "unknown.yaml", "method:\n  kay: 3\n")
    assert_usage_error(incr_ray("train", "--config", unknown), "method.kay", "valid keys")


def test_not_a_classifier_model(tmp_path):
    d = tmp_path / "notamodel"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "clip"}')
    proc = incr_ray("train", "--set", f"model.base={d}", "--set", f"storage.path={tmp_path}/runs")
    assert_usage_error(proc, "sequence-classification")


def test_bad_data_leaves_no_run_folder(tmp_path, tiny_bert):
    runs = tmp_path / "runs"
    missing = incr_ray("train", "--set", f"data.source={tmp_path}/nope.csv",
                       "--set", f"model.base={tiny_bert}", "--set", f"storage.path={runs}")
    assert_usage_error(missing, "nope.csv")
    csv = write(tmp_path / "one_class.csv", "text,label\n" + "".join(f"row {i},a\n" for i in range(200)))
    one_class = incr_ray("train", "--set", f"data.source={csv}",
                         "--set", f"model.base={tiny_bert}", "--set", f"storage.path={runs}")
    assert_usage_error(one_class, "class")
    two_classes = write(tmp_path / "two.csv", "text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(200)))
    no_holdout = incr_ray("train", "--set", f"data.source={two_classes}", "--set", "data.eval_fraction=0",
                          "--set", f"model.base={tiny_bert}", "--set", f"storage.path={runs}")
    assert_usage_error(no_holdout, "no holdout", "data.eval_fraction")
    assert not (runs / "incr-run").exists()


def test_predict_prints_labels(tiny_bert):
    proc = incr_ray("predict", "--model", tiny_bert, "a nice film", "a bad film")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].split("\t")[0] in {"c0", "c1", "c2"}
    assert_usage_error(incr_ray("predict", "--model", "/nonexistent", "x"), "not a model folder")


def test_evaluate_refuses_non_run(tmp_path):
    assert_usage_error(incr_ray("evaluate", "--run", str(tmp_path)), "not an incr-ray run folder")
