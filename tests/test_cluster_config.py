"""cluster.yaml and jobs/runtime_env.yaml, checked the way Ray reads them — without starting Ray.

cluster.yaml is validated against the JSON schema that the installed Ray ships and then prepared
(defaults filled in) and validated again, the first two steps of `ray up`; the AWS calls that
follow are the part no test here can make. The rest pins the choices the README promises: a head
that runs no training, autoscaling GPU workers, token authentication on everywhere, a dashboard
reachable only through `ray dashboard`, and a runtime env that matches the project's requirements.
"""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
GPU_INSTANCE_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.", "p5e.")


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())


def test_cluster_yaml_matches_rays_schema(cluster):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    validate_config(cluster)
    prepared = prepare_config(copy.deepcopy(cluster))  # what `ray up` does before calling AWS
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_head_runs_no_training_and_gpu_workers_autoscale(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "the head must offer no CPU, so no task or actor lands there"
    assert head["resources"].get("GPU", 0) == 0
    assert head.get("max_workers", 0) == 0
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    assert workers, "cluster.yaml needs a worker node type"
    for worker in workers:
        assert worker["node_config"]["InstanceType"].startswith(GPU_INSTANCE_FAMILIES)
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 2, "GPU workers should autoscale from 0"
        # Workers read and write s3:// (runs, data): they need an instance profile of their own.
        assert "IamInstanceProfile" in worker["node_config"]
    assert cluster["max_workers"] >= max(w["max_workers"] for w in workers)


def test_token_auth_is_on_for_every_node(cluster):
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    ray_starts = [c for c in starts if "ray start" in c]
    assert len(ray_starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in ray_starts), ray_starts
    # Every node gets the token the laptop's clients use.
    assert cluster["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


def test_nothing_turns_token_auth_off():
    disabled = re.compile(r"RAY_AUTH_MODE\W{0,3}disabled", re.IGNORECASE)
    files = [REPO / "cluster.yaml", REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
             *sorted((REPO / "jobs").iterdir())]
    offenders = [str(f.relative_to(REPO)) for f in files if f.is_file() and disabled.search(f.read_text())]
    assert not offenders, f"token authentication must stay on: {offenders}"


def test_dashboard_is_not_exposed(cluster):
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in (REPO / "cluster.yaml").read_text()
    # No extra inbound rules (Ray's security group opens SSH and intra-cluster traffic only).
    assert not cluster["provider"].get("security_group", {}).get("IpPermissions")


def test_setup_installs_torch_then_the_project(cluster):
    setup = cluster["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if re.search(r"pip install .*\btorch==", c))
    project_at = next(i for i, c in enumerate(setup) if "~/incr-ray" in c and "pip install" in c)
    assert torch_at < project_at, "install torch before the project, or pip picks a torch for it"
    import ray

    assert f"ray[train,data,default]=={ray.__version__}" in setup[project_at], "pin the cluster's Ray to ours"
    for remote, local in cluster["file_mounts"].items():
        if remote.startswith("~/incr-ray/"):
            assert (REPO / local).exists(), f"file_mounts source {local} is missing"
    mounted = {Path(local).name for remote, local in cluster["file_mounts"].items()}
    assert {"incr_ray", "pyproject.toml", "README.md"} <= mounted  # what `pip install ~/incr-ray` reads


def _requirement_names(requirements: list[str]) -> dict[str, str]:
    from packaging.requirements import Requirement

    return {Requirement(r).name.lower(): str(Requirement(r).specifier) for r in requirements}


def test_nodes_can_build_and_prebuild_cpu_adam_for_optimizer_offload(cluster):
    """deepspeed.offload_optimizer runs DeepSpeed's CPU Adam, a C++ op: the nodes need a compiler
    and Python's headers, and the op is built once at setup rather than per job."""
    setup = "\n".join(cluster["setup_commands"])
    assert "build-essential" in setup and "python3-dev" in setup
    assert "DS_BUILD_CPU_ADAM=1" in setup and "deepspeed==" in setup
    assert setup.index("build-essential") < setup.index("DS_BUILD_CPU_ADAM=1")


def test_runtime_env_is_valid_and_repeats_the_project_requirements(runtime_env):
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    assert set(runtime_env) == {"pip", "env_vars", "excludes"}
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = _requirement_names(pyproject["project"]["dependencies"])
    listed = _requirement_names(runtime_env["pip"]["packages"])
    # torch and ray must stay the node's own (CUDA build, cluster version); the rest as pyproject says.
    assert "torch" not in listed and "ray" not in listed
    assert listed == {k: v for k, v in wanted.items() if k not in ("torch", "ray")}
    assert "--no-build-isolation" in runtime_env["pip"]["pip_install_options"]  # deepspeed builds against torch


def test_runtime_env_leaves_incr_rays_own_env_vars_alone(runtime_env, monkeypatch):
    """Ray refuses to start a submitted job's driver when the job's runtime env and the driver's
    ray.init() set the same variable ("Failed to merge the Job's runtime env"), so the variables
    incr_ray.cli.init_ray sets must not be repeated in jobs/runtime_env.yaml."""
    import ray

    from incr_ray.cli import init_ray

    seen: dict = {}
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # init_ray sets it when attaching; undone afterwards
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    init_ray("127.0.0.1:1")  # the attach branch that a submitted job takes (RAY_ADDRESS is set)
    own = set(seen["runtime_env"]["env_vars"])
    assert "TOKENIZERS_PARALLELISM" in own
    assert not own & set(runtime_env["env_vars"]), own & set(runtime_env["env_vars"])
    assert all(isinstance(v, str) for v in runtime_env["env_vars"].values())


def test_working_dir_upload_is_the_code_only(runtime_env):
    """What `ray job submit --working-dir .` uploads with these excludes (Ray's own file walk)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[Path] = []
    _dir_travel(REPO, [_get_excludes(REPO, runtime_env["excludes"])],
                lambda p: files.append(p) if p.is_file() else None, include_gitignore=True)
    names = {str(p.relative_to(REPO)) for p in files}
    assert {"jobs/train.py", "jobs/extend.py", "jobs/gpu_cluster.yaml", "incr_ray/cli.py"} <= names
    for heavy in (".git/", ".venv/", "runs/"):
        assert not any(n.startswith(heavy) for n in names), f"{heavy} would be uploaded"
    assert sum(p.stat().st_size for p in files) < 50 * 2**20
