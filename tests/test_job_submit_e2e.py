"""incr-ray as users run it on a cluster: `ray job submit` to a Ray head with token authentication.

The head is a real `ray start --head` on 127.0.0.1 (one node: `ray start` refuses a second node
under RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps Ray on loopback). The jobs are the project's own entry
scripts, uploaded with `--working-dir .` and started with `jobs/runtime_env.yaml`, as
docs/cluster.md submits them; only the config is a tiny one (synthetic
data, a random-weight BERT, storage under pytest's tmp dir — the job runs on this machine) and the
runtime env leaves out its ``pip`` section (see ``TokenHead.runtime_env_file``).

Isolation from other Ray instances on the machine (a developer's `ray start`, other test runs):
- ports: the GCS, dashboard, client-server and dashboard-agent ports are free ports chosen at
  start, and workers use their own port range; the node's files live in a private --temp-dir;
- token: a token generated for this head, in a private file named by RAY_AUTH_TOKEN_PATH; the
  user's ~/.ray/auth_token is neither read nor written;
- stopping: plain `ray stop` would kill every Ray process on the machine, so it is never called.
  `ray start` is launched as the leader of a new process group; its daemons (GCS, raylet,
  dashboard, ...) stay in that group, Ray workers are children of our raylet. Stopping the head
  signals exactly those processes: the group's members and their descendants.

Each Ray Train fit costs ~30 s here (more when other tests share the CPUs), so the module runs
three fits (train k=2, then extend by one generation) on one head.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 600
# Workers bind in this range: outside Ray's default (10002-19999) and the kernel's ephemeral range.
WORKER_PORTS = (20100, 20399)


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_group_and_descendants(pgid: int):
    import psutil

    members = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            # A zombie has already exited; it only waits for its parent to reap it.
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
    found = {p.pid: p for p in members}
    for proc in members:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in proc.children(recursive=True)})
    alive = []
    for proc in found.values():
        with contextlib.suppress(psutil.Error):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _stop_head(pgid: int) -> None:
    """SIGTERM, then SIGKILL, every process of the node we started — and nothing else."""
    import psutil

    procs = _process_group_and_descendants(pgid)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive + _process_group_and_descendants(pgid):
        with contextlib.suppress(psutil.Error):
            proc.kill()


class TokenHead:
    """A `ray start --head` on 127.0.0.1 with token auth, and the environment its clients need."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it, and socket paths are limited to ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="irjob-", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = (
            _free_port() for _ in range(4)
        )
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.pgid: int | None = None

    def env(self, **extra: str | None) -> dict[str, str]:
        """The client/daemon environment; ``extra`` overrides it, None removes a variable."""
        env = dict(os.environ)
        for var in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(var, None)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(self.token_path),
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
            RAY_USAGE_STATS_ENABLED="0",
            # The raylet starts workers and the job's driver with this PATH: `python` is the venv's.
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        )
        for var, value in extra.items():
            if value is None:
                env.pop(var, None)
            else:
                env[var] = value
        return env

    def start(self) -> None:
        cmd = [
            str(BIN / "ray"), "start", "--head",
            "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
            f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}",
            "--num-cpus=2", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        proc = subprocess.Popen(
            cmd, env=self.env(), cwd=self.temp_dir, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.pgid = proc.pid  # the session leader's pid is the group id its daemons keep
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start failed:\n{out[-3000:]}"

    def stop(self) -> None:
        import psutil

        if self.pgid is not None:
            _stop_head(self.pgid)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        leftovers = []
        for proc in _process_group_and_descendants(self.pgid or -1):
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:  # killed, waiting for PID 1 to reap it
                    leftovers.append(proc)
        assert not leftovers, f"processes of the test's Ray head survived: {leftovers}"

    def ray(self, *args: str, timeout: float = 60, **env: str | None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "ray"), *args], env=self.env(**env), cwd=REPO, timeout=timeout,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def runtime_env_file(self) -> Path:
        """jobs/runtime_env.yaml without its ``pip`` section.

        With ``pip``, Ray builds the job a virtualenv; inside a virtualenv (our .venv) it does so by
        copying the whole venv (2+ GB, ~30 s or more here). The section's shape is checked in
        test_cluster_config.py; everything else (env_vars, excludes) is used as shipped.
        """
        env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
        env.pop("pip")
        path = self.temp_dir / "runtime_env.yaml"
        path.write_text(yaml.safe_dump(env))
        return path

    def submit(self, *entrypoint: str) -> tuple[str, str]:
        """`ray job submit` as the README writes it; blocks until the job ends. Returns (id, output)."""
        job_id = f"incr-ray-test-{uuid.uuid4().hex[:8]}"
        done = self.ray(
            "job", "submit", "--address", self.address, "--submission-id", job_id,
            "--working-dir", ".", "--runtime-env", str(self.runtime_env_file()),
            "--", *entrypoint,
            timeout=JOB_TIMEOUT_S,
        )
        assert done.returncode == 0, f"job {job_id} failed:\n{done.stdout[-6000:]}"
        return job_id, done.stdout

    def job_details(self, job_id: str) -> dict:
        code = (
            "import json, sys\n"
            "from ray.job_submission import JobSubmissionClient\n"
            "info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])\n"
            "print(json.dumps(info.dict(), default=str))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, self.address, job_id], env=self.env(), cwd=self.temp_dir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def head():
    head = TokenHead()
    try:
        head.start()
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def trained_run(head, tiny_bert, tmp_path_factory):
    """A k=2 run trained by `ray job submit -- python jobs/train.py` (shared by the tests below)."""
    work = tmp_path_factory.mktemp("job_submit")
    config = work / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "from-yaml", "seed": 1},
        "storage": {"path": str(work / "runs")},  # absolute: the job runs on this machine
        "data": {"source": "synthetic", "synthetic_rows": 600, "synthetic_classes": 3, "eval_fraction": 0.2},
        "model": {"base": tiny_bert, "max_length": 32},
        # The generation gate guards the extension below; 15 steps a generation draws the warning.
        "method": {"k": 2, "threshold": 0.9, "validation_fraction": 0.2, "keep_best": True},
        "student": {"epochs": 1, "min_steps": 0, "learning_rate": 1e-2, "batch_size": 16},
        "deepspeed": {"stage": 2},
        # A job attaches to a cluster, where `auto` with no GPU is refused (it may autoscale).
        "cluster": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False},
        "teacher": {"batch_size": 128},
    }))
    started = time.perf_counter()
    # `--set` is forwarded by jobs/train.py like any other argument of `incr-ray train`.
    job_id, output = head.submit("python", "jobs/train.py", "--config", str(config), "--set", "run.name=job-run")
    return {
        "job_id": job_id, "output": output, "work": work, "run_dir": work / "runs" / "job-run",
        "seconds": time.perf_counter() - started,
    }


def test_cluster_refuses_clients_without_the_token(head):
    ok = head.ray("job", "list", "--address", head.address)
    assert ok.returncode == 0, ok.stdout[-2000:]
    wrong = head.ray("job", "list", "--address", head.address, RAY_AUTH_TOKEN="not-the-token")
    assert wrong.returncode != 0, "a wrong token must be refused"
    empty_home = head.temp_dir / "home"
    empty_home.mkdir(exist_ok=True)
    no_token = head.ray("job", "list", "--address", head.address, HOME=str(empty_home),
                        RAY_AUTH_MODE=None, RAY_AUTH_TOKEN_PATH=None)
    assert no_token.returncode != 0, "a client without any token must be refused"


def test_train_job_runs_on_the_cluster_and_writes_the_run(head, trained_run):
    details = head.job_details(trained_run["job_id"])
    assert details["status"] == "SUCCEEDED", details
    # The driver registered with *this* cluster's GCS: jobs/train.py attached through the
    # RAY_ADDRESS that Ray sets for a submitted job instead of starting a Ray of its own.
    assert details["driver_info"] and details["driver_info"]["node_ip_address"] == "127.0.0.1", details

    manifest = json.loads((trained_run["run_dir"] / "run.json").read_text())
    assert manifest["name"] == "job-run" and manifest["status"] == "finished"
    assert [g["status"] for g in manifest["generations"]] == ["finished", "finished"]
    assert manifest["final_model"] == "gen_001/model"
    assert "final model:" in trained_run["output"]  # the job's stdout reached `ray job submit`
    assert "optimizer steps can hardly move a pretrained model; raise student.min_steps" in trained_run["output"]

    from transformers import pipeline

    clf = pipeline("text-classification", model=str(trained_run["run_dir"] / "gen_001" / "model"), device="cpu")
    assert {o["label"] for o in clf(["some words", "other words here"])} <= set(manifest["label_names"])


def test_extend_job_adds_one_generation(head, trained_run):
    from incr_ray.data import SYNTHETIC_LABELS, synthetic_rows

    run_dir = trained_run["run_dir"]
    before = json.loads((run_dir / "run.json").read_text())
    # New data with the run's labels: synthetic rows the run has never seen (other ids, other seed).
    texts, classes = synthetic_rows(np.arange(100_000, 100_240), seed=7, classes=3)
    new_data = trained_run["work"] / "new_block.csv"
    pd.DataFrame({"text": texts, "label": np.array(SYNTHETIC_LABELS)[classes]}).to_csv(new_data, index=False)
    assert set(np.array(SYNTHETIC_LABELS)[classes]) == set(before["label_names"])

    # The extension trains at the run schedule's floor (10% of the peak) although the run used the
    # default per-generation schedule: extend may change how its own generation trains.
    job_id, output = head.submit("python", "jobs/extend.py", "--run", str(run_dir), "--data", str(new_data),
                                 "--holdout-fraction", "0.25", "--set", "student.schedule=run")
    assert head.job_details(job_id)["status"] == "SUCCEEDED"

    after = json.loads((run_dir / "run.json").read_text())
    assert after["status"] == "finished"
    gens = after["generations"]
    assert [g["index"] for g in gens] == [0, 1, 2]
    assert all(g["status"] == "finished" for g in gens)
    assert gens[2].get("extended") is True and not gens[0].get("extended") and not gens[1].get("extended")
    assert gens[2]["source"] == str(new_data)
    assert gens[2]["settings"] == {"student.schedule": "run"} and "settings" not in gens[1]
    assert after["config"]["student"]["schedule"] == "generation"  # the run's own, for its next extension
    assert "generation 2 trains with student.schedule=run (the run's: student.schedule=generation)" in output
    assert gens[1]["train"]["max_learning_rate"] > 0.5e-2  # warmed up to the 1e-2 peak
    assert gens[2]["train"]["max_learning_rate"] == pytest.approx(1e-3)  # the floor, from the first step
    assert "extension (trained with `student.schedule=run`)" in (run_dir / "report.md").read_text()
    # A quarter of the new rows (a seeded hash) held out as the extension's own holdout, scored
    # by the generation trained on the rest.
    held_out = pq.read_table(run_dir / "gen_002" / "own_holdout").to_pandas()
    from incr_ray.method.hashing import extension_holdout_mask, row_ids

    frame = pd.read_csv(new_data)
    ids = row_ids(frame.text.tolist(), frame.label.tolist())
    mask = extension_holdout_mask(ids, 1, 0.25)  # the run's seed
    assert sorted(held_out.row_id) == sorted(ids[mask]) and gens[2]["own_holdout_rows"] == mask.sum()
    assert gens[2]["block_rows"] == 240 - mask.sum()
    assert gens[2]["drift"]["2"]["rows"] == mask.sum() and 0 <= gens[2]["drift"]["2"]["accuracy"] <= 1
    assert "## Drift: accuracy on each data set's own holdout" in (run_dir / "report.md").read_text()
    assert after["data"]["block_sizes"][:2] == before["data"]["block_sizes"]
    assert after["data"]["block_sizes"][2] == 240 - mask.sum()
    # The gate decided on the new block's validation slice, and the console said what the
    # extension did to the holdout accuracy.
    promoted = gens[2]["promoted"]
    assert after["final_model"] == ("gen_002/model" if promoted else "gen_001/model")
    assert after["final_generation"] == (2 if promoted else 1)
    a, b = gens[1]["metrics"]["accuracy"], gens[2]["metrics"]["accuracy"]
    assert f"extension: holdout accuracy {a:.4f} (gen 1) → {b:.4f} (gen 2)" in output
    if not promoted:
        assert "the final model stays generation 1" in output
    elif b < a:
        assert "warning: generation 2 is" in output
    # The earlier generations are untouched.
    assert gens[:2] == before["generations"]
    assert (run_dir / "gen_002" / "targets").is_dir()

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "gen_002" / "model")
    assert [model.config.id2label[i] for i in range(3)] == after["label_names"]
