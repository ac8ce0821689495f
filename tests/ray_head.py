"""A real `ray start --head` on 127.0.0.1 with token authentication, for the tests that submit jobs.

Isolation from other Ray instances on the machine (a developer's `ray start`, other test runs):
- ports: the GCS, dashboard, client-server and dashboard-agent ports are free ports chosen at
  start, and workers use a port range the caller gives (outside Ray's default 10002-19999 and the
  kernel's ephemeral range); the node's files live in a private --temp-dir;
- token: a token generated for this head, in a private file named by RAY_AUTH_TOKEN_PATH; the
  user's ~/.ray/auth_token is neither read nor written;
- stopping: plain `ray stop` would kill every Ray process on the machine, so it is never called.
  `ray start` is launched as the leader of a new process group; its daemons (GCS, raylet,
  dashboard, ...) stay in that group, Ray workers are children of our raylet. Stopping the head
  signals exactly those processes: the group's members and their descendants.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from incr_ray.generation.local_group import free_port

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JOB_TIMEOUT_S = 600


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
    """A `ray start --head` on 127.0.0.1 with token auth, and the environment its clients need.
    Its workers bind in ``worker_ports``: two heads that may run at once (make test's two xdist
    workers) need ranges that do not overlap."""

    def __init__(self, worker_ports: tuple[int, int]) -> None:
        self.worker_ports = worker_ports
        # Short: Ray's unix sockets live under it, and socket paths are limited to ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="irjob-", dir="/tmp"))
        self.token_path = self.temp_dir / "auth_token"
        self.token_path.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.gcs_port, self.dashboard_port, self.client_port, self.agent_port = (
            free_port() for _ in range(4)
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
            f"--min-worker-port={self.worker_ports[0]}", f"--max-worker-port={self.worker_ports[1]}",
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

    def submit(self, *entrypoint: str) -> tuple[str, str]:
        """`ray job submit` as the README writes it; blocks until the job ends. Returns (id, output)."""
        job_id = f"incr-ray-test-{uuid.uuid4().hex[:8]}"
        done = self.ray(
            "job", "submit", "--address", self.address, "--submission-id", job_id,
            "--working-dir", ".", "--runtime-env", str(REPO / "jobs" / "runtime_env.yaml"),
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


@contextlib.contextmanager
def running_head(worker_ports: tuple[int, int]) -> Iterator[TokenHead]:
    """A started head, stopped (with a check that none of its processes survive) on exit."""
    head = TokenHead(worker_ports)
    try:
        head.start()
        yield head
    finally:
        head.stop()
