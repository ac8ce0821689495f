"""Shared fixtures: a local Ray on 127.0.0.1 and tiny random-weight models built from a config."""

from __future__ import annotations

import os

# Keep every Ray process of the suite on loopback: with this variable Ray binds 127.0.0.1 instead
# of the machine's interface address. Set before ray is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import tempfile

# `make test` runs the suite in two pytest-xdist workers. Each gets a temporary folder of its own,
# inherited by the Ray it starts and by every subprocess: Ray's session files, the
# `ray_current_cluster` file a bare ray.init() would join, and the training workers' scratch folders
# (which R1 and R3 count) never mix between the workers. Short: Ray's unix sockets live under it.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["TMPDIR"] = tempfile.tempdir = tempfile.mkdtemp(prefix=f"irt-{XDIST_WORKER}-", dir="/tmp")

import time
from pathlib import Path
from types import SimpleNamespace

import pytest

RAY_FIXTURES = {"ray_local", "reference_run", "crash_run", "two_node_cluster", "faults_run", "extended_copy"}
# Under xdist (make test) each scenario run's tests share one worker: R2 and R5 build on R1's session
# fixture, which a second worker would run again. The controller schedules by module path (it sees
# test ids, not fixtures), so the modules that read one are listed; each worker checks the list
# against the fixtures its tests use (pytest_collection_modifyitems). Any other module is a unit of
# its own, so its module fixtures run once too.
SCENARIO_FIXTURES = {"reference_run": "R1-R2-R5", "faults_run": "R3", "two_node_cluster": "R4"}
SCENARIO_MODULES = {
    "tests/run/test_reference_run.py": "R1-R2-R5",
    "tests/run/test_crash_resume.py": "R1-R2-R5",
    "tests/test_job_submit_e2e.py": "R1-R2-R5",
    "tests/run/test_faults_e2e.py": "R3",
    "tests/test_multinode_e2e.py": "R4",
}
# Where each end-to-end run spent its time, per generation, from its run.json: printed at the end
# of the session (``timings``), so a slow suite says which run and which phase. Under xdist the
# workers append their lines to the file the controller names in this variable.
RUN_TIMINGS: list[str] = []
TIMINGS_FILE = "INCR_RAY_TEST_TIMINGS"
PHASES = ("fit_startup_seconds", "setup_seconds", "train_seconds", "save_seconds", "eval_seconds",
          "fit_shutdown_seconds", "fit_seconds")


def timings(label: str, manifest: dict) -> None:
    """Keep one line per generation of ``manifest`` (run.json as a dict) for the session's summary."""
    for g in manifest.get("generations", []):
        t = g.get("train") or {}
        phases = "  ".join(f"{p.removesuffix('_seconds')} {t[p]:6.1f}" for p in PHASES if t.get(p) is not None)
        scoring = g.get("scoring_seconds")
        RUN_TIMINGS.append(f"{label:<14} gen {g['index']}  " + (f"scoring {scoring:5.1f}  " if scoring else "")
                           + phases + f"  | generation {g.get('seconds') or 0:6.1f} s")
        if XDIST_WORKER and os.environ.get(TIMINGS_FILE):
            with open(os.environ[TIMINGS_FILE], "a") as f:
                f.write(RUN_TIMINGS.pop() + "\n")


def pytest_configure(config):
    if not XDIST_WORKER and getattr(config.option, "numprocesses", None):
        # Workers start after this and inherit the environment.
        fd, path = tempfile.mkstemp(prefix="incr-ray-timings-", suffix=".txt")
        os.close(fd)
        os.environ[TIMINGS_FILE] = path
        config.add_cleanup(lambda: os.unlink(path))


def pytest_unconfigure(config):
    """An xdist worker removes its temporary folder once its Ray has stopped."""
    if XDIST_WORKER:
        import shutil
        import sys

        if "ray" in sys.modules and sys.modules["ray"].is_initialized():
            sys.modules["ray"].shutdown()
        shutil.rmtree(tempfile.gettempdir(), ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if not XDIST_WORKER and os.environ.get(TIMINGS_FILE):
        RUN_TIMINGS.extend(Path(os.environ[TIMINGS_FILE]).read_text().splitlines())
    if RUN_TIMINGS:
        terminalreporter.section("end-to-end runs: seconds per generation (run.json)")
        for line in RUN_TIMINGS:
            terminalreporter.write_line(line)


# A test with none of these marks is a fast one (make test-fast runs it): over this budget it fails.
# Checked when the suite runs in one process (make test-fast): under xdist the other worker's
# scenario runs share the CPUs, and the time would measure them.
BUDGET_S = 5.0
SLOW_MARKS = ("e2e", "ray", "slow")


def pytest_sessionstart(session):
    """Import the heavy libraries once, up front: the budget below then measures each test's own
    work, not whichever test happens to import transformers or Ray first."""
    import incr_ray.run.loop  # noqa: F401  (Ray, Ray Data and Train, torch, transformers, peft)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (not XDIST_WORKER and report.when == "call" and report.passed and call.duration > BUDGET_S
            and not any(next(item.iter_markers(name=m), None) for m in SLOW_MARKS)):
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {call.duration:.1f} s, over the {BUDGET_S:g} s budget of a fast "
                           "test: make it cheaper, or mark it slow (subprocesses, process groups)")


def pytest_collection_finish(session):
    """The pins test waits on the package index for about a minute: when it is selected, its pip
    resolutions start now, in the background, and it collects them when its turn comes."""
    import shutil
    import tempfile

    if XDIST_WORKER:  # every worker collects it, one runs it: that one starts them itself
        return
    pins = [i for i in session.items if i.nodeid.endswith("test_pins.py::test_the_pins_resolve_for_the_cluster_python")]
    if pins:
        folder = tempfile.mkdtemp(prefix="incr-ray-pins-")
        session.config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
        try:
            pins[0].module.start_early(Path(folder))
        except Exception:  # noqa: BLE001 - the test itself starts them again and says what is wrong
            pass


def pytest_collection_modifyitems(items):
    """Tests that start Ray are marked ``ray``: ``make test-fast`` leaves them out. Under xdist, a
    module whose tests read a scenario run must be in SCENARIO_MODULES under that run's group."""
    wrong = set()
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if RAY_FIXTURES & fixtures:
            item.add_marker(pytest.mark.ray)
        module = item.nodeid.split("::")[0]
        for fixture, group in SCENARIO_FIXTURES.items():
            if fixture in fixtures and SCENARIO_MODULES.get(module) != group:
                wrong.add(f"{module}: {group}")
    if XDIST_WORKER and wrong:
        raise pytest.UsageError("tests/conftest.py: add to SCENARIO_MODULES " + ", ".join(sorted(wrong)))


def pytest_xdist_make_scheduler(config, log):
    """make test's scheduling: whole modules to whichever worker is free, the modules of one
    scenario run together (SCENARIO_MODULES), the largest unit first."""
    from xdist.scheduler import LoadScopeScheduling

    class ScenarioScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0]
            return SCENARIO_MODULES.get(module, module)

    return ScenarioScheduling(config, log)


def start_local_ray():
    """The session's local Ray on 127.0.0.1 (2 CPUs), started on first use; a test that needs its
    own cluster (multi-node) shuts it down, and the next user starts it again."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    return ray


@pytest.fixture
def ray_local():
    """The session's local Ray (faults travel with each call, see incr_ray.faults: no test needs a Ray of its own)."""
    yield start_local_ray()


def worker_folders() -> set[str]:
    """The training workers' scratch folders (each holds a copy of its generation's model)."""
    import glob
    import tempfile

    return set(glob.glob(f"{tempfile.gettempdir()}/incr-ray-g*-r*-*"))


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_bert_base):
    """R1 (see scenarios.py): the reference run, in-process, then one ``evaluate`` of every
    generation on a labelled file that holds the holdout rows."""
    import pyarrow.parquet as pq

    from incr_ray.run.loop import evaluate_run, run_generations
    from scenarios import reference_config, saved_dataset

    start_local_ray()
    work = tmp_path_factory.mktemp("reference")
    data = saved_dataset(work / "weather")
    cfg = reference_config(work / "runs", data, tiny_bert_base)
    before = worker_folders()
    said: list[str] = []
    started = time.perf_counter()
    manifest = run_generations(cfg, say=said.append)
    seconds = time.perf_counter() - started
    timings("R1 reference", manifest)
    left = worker_folders() - before
    root = Path(cfg.run_dir)
    split = pq.read_table(root / "split").to_pandas()
    holdout = split[split.block == -1]
    labelled = work / "holdout.csv"
    names = manifest["label_names"]
    holdout.assign(weather=[names[i] for i in holdout.label]).rename(columns={"text": "sentence"})[
        ["sentence", "weather"]].to_csv(labelled, index=False)
    evaluated = evaluate_run(str(root), str(labelled), all_generations=True)
    return SimpleNamespace(cfg=cfg, manifest=manifest, said=said, root=root, work=work, data=data, base=tiny_bert_base,
                           split=split, evaluated=evaluated, scratch_left=left, seconds=seconds)


@pytest.fixture(scope="session")
def crash_run(reference_run):
    """R2 (see scenarios.py): R1's config as a YAML file under the name ``crash``, trained by the
    CLI; while generation 1 runs a second ``train`` is refused; then the whole process group is
    SIGKILLed, a resume with a changed setting is refused, and the same command finishes the run."""
    import json
    import os
    import signal

    import yaml

    from scenarios import cli, cli_run, read_until, reference_settings

    ref = reference_run
    settings = reference_settings(ref.work / "runs", ref.data, ref.base, "crash")
    cfg_file = ref.work / "crash.yaml"
    cfg_file.write_text(yaml.safe_dump(settings))
    root = ref.work / "runs" / "crash"
    out = SimpleNamespace(root=root, cfg_file=cfg_file, status_running=None)

    def status_once_progress_shows() -> bool:
        if not list(root.glob("gen_*/progress.json")):
            return False
        out.status_running = cli_run("status", "--run", str(root), timeout=120)
        return True

    first = cli("train", "--config", str(cfg_file))
    out.first_lines = read_until(first, "gen 0/1", 600, while_waiting=status_once_progress_shows)
    out.stopped = json.loads((root / "run.json").read_text())
    started = time.perf_counter()
    out.second = cli_run("train", "--config", str(cfg_file), timeout=300)
    out.second_seconds = time.perf_counter() - started
    out.first_alive_after_second = first.poll() is None
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    model0 = root / "gen_000" / "model" / "model.safetensors"
    out.model0_mtime = model0.stat().st_mtime_ns
    out.manifest_bytes_killed = (root / "run.json").read_bytes()
    out.changed = cli_run("train", "--config", str(cfg_file), "--set", "method.threshold=0.8", timeout=300)
    out.manifest_bytes_refused = (root / "run.json").read_bytes()
    out.resumed = cli_run("train", "--config", str(cfg_file), timeout=900)
    out.manifest = json.loads((root / "run.json").read_text())
    out.model0_mtime_after = model0.stat().st_mtime_ns
    out.status_finished = cli_run("status", "--run", str(root), timeout=120)
    timings("R2 crash", out.manifest)
    return out


def build_tiny_model(path, family: str = "bert", num_labels: int = 3, labels=None, head: bool = True):
    """Save a tiny random-weight sequence classifier (2 layers, hidden 32) with the bundled MiniLM tokenizer."""
    from incr_ray.modeling import save_random_classifier

    return save_random_classifier(path, family, labels or [f"c{i}" for i in range(num_labels)], head=head)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert"), "bert")


@pytest.fixture(scope="session")
def tiny_bert_base(tmp_path_factory):
    """A tiny BERT without a classification head (like MiniLM): every run initialises a new one."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_bert_base"), "bert", head=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama-style decoder classifier (3 labels) whose config has no pad token."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama")


@pytest.fixture(scope="session")
def _empty_mlflow_store(tmp_path_factory):
    """A new MLflow SQLite store, made once: creating its tables takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(tmp_path, _empty_mlflow_store):
    """A real, empty MLflow SQLite store of this test's own: ``<tmp_path>/mlflow.db`` (a copy of the session's)."""
    import shutil

    dest = tmp_path / "mlflow.db"
    shutil.copyfile(_empty_mlflow_store, dest)
    return dest
