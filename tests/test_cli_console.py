"""Bad input reaches the console as one line: the whole output of the CLI (stdout and stderr,
Ray's and the libraries' included) is at most 3 lines, with no traceback, and exit code 2.

The truncated-JSONL case runs the installed ``incr-ray`` script as a user would. The rest run
in one Python subprocess that calls ``incr_ray.cli.main`` once per case with file descriptors 1
and 2 pointed at a file of that case, so that Ray starts once: first the cases that must fail
before Ray starts (checked with ``ray.is_initialized()``), then the bad data files, which are
read by Ray Data tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from small_run import fake_run

pytestmark = pytest.mark.e2e

MAX_LINES = 3
ROWS = 60


def ray_env() -> dict[str, str]:
    """Ray on 127.0.0.1, never an outside cluster (as in test_cli.py)."""
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return env


def _rows(labels: str = "ab") -> list[tuple[str, str]]:
    return [(f"row {i} a few words", labels[i % len(labels)]) for i in range(ROWS)]


def _csv(path: Path, header: str, rows) -> str:
    path.write_text(header + "\n" + "".join(f"{t},{label}\n" for t, label in rows))
    return str(path)


def _jsonl(path: Path, rows, tail: str = "", encoding: str = "utf-8") -> str:
    text = "".join(json.dumps({"text": t, "label": label}, ensure_ascii=False) + "\n" for t, label in rows)
    path.write_bytes((text + tail).encode(encoding))
    return str(path)


# Each bad data file, and words its error line must hold.
DATA_NEEDLES = {
    "truncated_jsonl": ["truncated.jsonl", "as jsonl"],
    "csv_without_label_column": ["no column 'label'", "category", "data.label_column"],
    "csv_with_empty_text": [f"1 of {ROWS} rows", "empty"],
    "labels_not_in_data_labels": ["not in data.labels", "'c'"],
    "non_utf8_jsonl": ["latin1.jsonl", "not valid UTF-8"],
    "single_class": ["single class 'a'"],
    "folder_mixing_csv_and_jsonl": ["mixes csv, jsonl", "data.format"],
    # Read and split fine, but a trained 3-label head cannot be resized under ZeRO-3 (refused
    # after the data is read, before the run folder is written).
    "zero3_head_of_another_size": ["head for 3 labels but the data has 2", "deepspeed.stage 2"],
}


def _data_cases(d: Path, three_label_model: str = "minilm") -> dict[str, tuple[str, list[str]]]:
    """Write the bad data files: name -> (data.source, more --set overrides)."""
    mixed = d / "mixed"
    mixed.mkdir()
    _csv(mixed / "a.csv", "text,label", _rows())
    _jsonl(mixed / "b.jsonl", _rows())
    empty_text = [("" if i == 7 else t, label) for i, (t, label) in enumerate(_rows())]
    return {
        "truncated_jsonl": (_jsonl(d / "truncated.jsonl", _rows(), tail='{"text": "abc", "lab'), []),
        "csv_without_label_column": (_csv(d / "nolabel.csv", "text,category", _rows()), []),
        "csv_with_empty_text": (_csv(d / "empty.csv", "text,label", empty_text), []),
        "labels_not_in_data_labels": (_csv(d / "abc.csv", "text,label", _rows("abc")), ["data.labels=[a,b]"]),
        "non_utf8_jsonl": (_jsonl(d / "latin1.jsonl", [(t + " café", label) for t, label in _rows()],
                                  encoding="latin-1"), []),
        "single_class": (_csv(d / "one.csv", "text,label", [(t, "a") for t, _ in _rows()]), []),
        "folder_mixing_csv_and_jsonl": (str(mixed), []),
        "zero3_head_of_another_size": (_csv(d / "two.csv", "text,label", _rows()),
                                       [f"model.base={three_label_model}", "deepspeed.stage=3", "method.k=2",
                                        "student.batch_size=4"]),
    }


def _train_args(source: str, more: list[str], runs: Path) -> list[str]:
    sets = ["model.base=minilm", f"data.source={source}", *more, f"storage.path={runs}"]
    return ["train", *[a for s in sets for a in ("--set", s)]]


def assert_one_line_error(code, output: str, *needles: str) -> None:
    assert code == 2, (code, output[-3000:])
    assert "Traceback" not in output, output[-3000:]
    lines = output.strip().splitlines()
    assert len(lines) <= MAX_LINES, output[-3000:]
    errors = [line for line in lines if line.startswith("incr-ray: error:")]
    assert len(errors) == 1, output[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]


DRIVER = r'''
import json, os, sys, traceback
import ray
from incr_ray import cli

cases, out_dir = json.load(open(sys.argv[1])), sys.argv[2]
results = {}
for case in cases:
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.path.join(out_dir, case["name"] + ".out"), "wb") as f:
        os.dup2(f.fileno(), 1); os.dup2(f.fileno(), 2)
        try:
            try:
                code = cli.main(case["argv"])
            except SystemExit as exit:
                code = exit.code
            except BaseException:
                traceback.print_exc()
                code = 1
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os.dup2(saved[0], 1); os.dup2(saved[1], 2)
            os.close(saved[0]); os.close(saved[1])
    results[case["name"]] = {"code": code, "ray_started": ray.is_initialized()}
print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def console(tmp_path_factory, tiny_bert):
    """Run every case in one subprocess; name -> (exit code, whole console output, Ray started by then)."""
    d = tmp_path_factory.mktemp("console")
    runs = d / "runs"
    before_ray = {
        "evaluate_not_a_run": ["evaluate", "--run", str(d)],
        "extend_missing_data": ["extend", "--run", fake_run(d / "fake" / "incr-run"),
                                "--data", str(d / "missing.jsonl")],
    }
    cases = [{"name": n, "argv": argv} for n, argv in before_ray.items()]
    cases += [{"name": n, "argv": _train_args(src, more, runs)} for n, (src, more) in _data_cases(d, tiny_bert).items()]
    (d / "cases.json").write_text(json.dumps(cases))
    (d / "driver.py").write_text(DRIVER)
    out_dir = d / "out"
    out_dir.mkdir()
    proc = subprocess.run([sys.executable, str(d / "driver.py"), str(d / "cases.json"), str(out_dir)],
                          capture_output=True, text=True, env=ray_env(), timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    yield {name: (r["code"], (out_dir / f"{name}.out").read_text(errors="replace"), r["ray_started"])
           for name, r in results.items()}, runs


@pytest.mark.parametrize("name, needles", [
    ("evaluate_not_a_run", ["not an incr-ray run folder", "run.json"]),
    ("extend_missing_data", ["--data", "missing.jsonl", "does not exist"]),
])
def test_run_folder_errors_before_ray(console, name, needles):
    results, _ = console
    code, output, ray_started = results[name]
    assert_one_line_error(code, output, *needles)
    assert len(output.strip().splitlines()) == 1, output
    assert not ray_started


@pytest.mark.parametrize("name", list(DATA_NEEDLES))
def test_bad_data_is_one_line(console, name):
    results, runs = console
    code, output, _ = results[name]
    assert_one_line_error(code, output, *DATA_NEEDLES[name])
    assert not (runs / "incr-run").exists()


def test_truncated_jsonl_from_the_installed_script(tmp_path):
    """The case from the issue, as a new user runs it: ~190 lines with three tracebacks before."""
    source, more = _data_cases(tmp_path)["truncated_jsonl"]
    script = Path(sys.executable).with_name("incr-ray")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "incr_ray.cli"]
    proc = subprocess.run([*command, *_train_args(source, more, tmp_path / "runs")],
                          capture_output=True, text=True, env=ray_env(), timeout=600)
    assert_one_line_error(proc.returncode, proc.stdout + proc.stderr, *DATA_NEEDLES["truncated_jsonl"])
    assert not (tmp_path / "runs" / "incr-run").exists()
