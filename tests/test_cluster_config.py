"""cluster.yaml and jobs/runtime_env.yaml, checked the way Ray reads them — without starting Ray.

cluster.yaml is validated against the JSON schema that the installed Ray ships and then prepared
(defaults filled in) and validated again, the first two steps of `ray up`; the AWS calls that
follow are the part no test here can make. The rest pins the choices the README promises: a head
that runs no training, autoscaling GPU workers, token authentication on everywhere, a dashboard
reachable only through `ray dashboard`, GPU workers on EFA in a cluster placement group with the
NCCL plugin found and said in a node label, fast disks (instance NVMe, gp3 throughput), and a
runtime env that installs nothing on nodes cluster.yaml set up. (The Python the nodes get, and the
pins against it: tests/test_pins.py.)
"""

from __future__ import annotations

import copy
import json
import re
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


def _gpu_workers(cluster) -> list[tuple[str, dict]]:
    return [(name, t) for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]


def test_gpu_workers_get_efa_in_a_cluster_placement_group(cluster):
    """Each GPU node type has an EFA interface on network card 0 (device 0), in one subnet with
    the security group the head shares, and a placement group that the header's commands create
    with the cluster strategy. The interface shape is what Ray's AWS provider accepts
    (``_configure_subnets_and_groups_from_network_interfaces``: subnet and groups only inside each
    interface); with boto3 installed, Ray's own function checks it too."""
    head = cluster["available_node_types"][cluster["head_node_type"]]["node_config"]
    text = (REPO / "cluster.yaml").read_text()
    for name, worker in _gpu_workers(cluster):
        config = worker["node_config"]
        interfaces = config["NetworkInterfaces"]
        first = next(i for i in interfaces if i["NetworkCardIndex"] == 0)
        assert first["DeviceIndex"] == 0 and first["InterfaceType"] == "efa", name
        _check_interfaces(interfaces)  # EFA traffic stays inside one subnet
        assert not {"SubnetId", "SubnetIds", "SecurityGroupIds"} & set(config), \
            f"{name}: Ray refuses these beside network interfaces"
        assert {g for i in interfaces for g in i["Groups"]} == set(head["SecurityGroupIds"]), \
            f"{name}: the head and the workers share one security group"
        # AWS assigns a public IP only to a single interface; the setup needs one (or a NAT) to install.
        assert interfaces[0].get("AssociatePublicIpAddress") is (len(interfaces) == 1 or None), name
        group = config["Placement"]["GroupName"]
        assert re.search(rf"create-placement-group --group-name {re.escape(group)} --strategy cluster", text)
    # The security group: all traffic from itself in and out (EFA), SSH from one address, nothing wider.
    assert "authorize-security-group-ingress --group-id $SG --protocol -1 --source-group $SG" in text
    assert "authorize-security-group-egress --group-id $SG --protocol -1 --source-group $SG" in text
    try:
        from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
    except ImportError:  # boto3 is not a project requirement
        return
    configured = _configure_from_network_interfaces(copy.deepcopy(cluster))
    for name, worker in _gpu_workers(configured):
        assert worker["node_config"]["SubnetIds"] == ["subnet-REPLACE-WITH-YOUR-SUBNET"]


def _check_interfaces(interfaces: list[dict]) -> None:
    """Ray's rules for a node type's network interfaces (each has its subnet and groups), and AWS's
    for EFA: one interface per network card, device 0 on card 0 only, all in one subnet."""
    cards = [i["NetworkCardIndex"] for i in interfaces]
    assert sorted(cards) == list(range(len(cards))), cards
    assert all(i["DeviceIndex"] == (0 if i["NetworkCardIndex"] == 0 else 1) for i in interfaces)
    assert all(i["InterfaceType"] in ("efa", "efa-only") and i["SubnetId"] and i["Groups"] for i in interfaces)
    assert len({i["SubnetId"] for i in interfaces}) == 1
    assert len(interfaces) == 1 or not any(i.get("AssociatePublicIpAddress") for i in interfaces)


def test_the_documented_p4d_interfaces_follow_the_same_rules():
    """docs/cluster.md's network interfaces for p4d.24xlarge: every EFA card, no public IP."""
    text = (REPO / "docs" / "cluster.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "NetworkInterfaces" in b]
    assert len(blocks) == 1
    interfaces = blocks[0]["NetworkInterfaces"]
    _check_interfaces(interfaces)
    assert len(interfaces) == 4  # p4d.24xlarge: 4 EFA network cards


def test_gpu_workers_find_the_nccl_plugin_and_say_so_in_a_label(cluster):
    """Worker setup exports FI_PROVIDER=efa and the aws-ofi-nccl plugin's folder on LD_LIBRARY_PATH
    where the node has both (else NCCL uses TCP), and `ray start` labels the node with what it
    found, in the form Ray parses; `cluster.interconnect: auto` reads that label."""
    from ray._private.label_utils import parse_node_labels_string

    from incr_ray.resolve import INTERCONNECT_LABEL

    setup = "\n".join(cluster["worker_setup_commands"])
    assert "fi_info -p efa" in setup and "libnccl-net.so" in setup and "/opt/amazon/ofi-nccl" in setup
    assert 'export FI_PROVIDER=efa LD_LIBRARY_PATH=$(dirname "$plugin"):/opt/amazon/efa/lib' in setup
    assert "INCR_RAY_INTERCONNECT=efa" in setup and "INCR_RAY_INTERCONNECT=tcp" in setup
    assert "> ~/.incr-ray-node.sh" in setup and "'. ~/.incr-ray-node.sh' >> ~/.bashrc" in setup
    start = " ".join(cluster["worker_start_ray_commands"])
    labels = re.search(r"--labels=(\S+)", start).group(1)
    for found in ("efa", "tcp"):
        assert parse_node_labels_string(labels.replace("${INCR_RAY_INTERCONNECT:-tcp}", found)) == \
            {INTERCONNECT_LABEL: found}
    import ray.scripts.scripts as ray_cli

    assert "labels" in {p.name for p in ray_cli.start.params}, "this Ray's `ray start` lost --labels"


def test_fast_disks_for_staging_cache_checkpoints_and_spill(cluster):
    """gp3 root volumes above the 125 MB/s default; on the GPU nodes TMPDIR (Ray's session and spill,
    staged models, checkpoints before upload) and HF_HOME on the instance NVMe the AMI mounts."""
    for name, node in cluster["available_node_types"].items():
        ebs = node["node_config"]["BlockDeviceMappings"][0]["Ebs"]
        assert ebs["VolumeType"] == "gp3" and ebs["Throughput"] >= 250, name
        assert ebs["Throughput"] <= ebs["Iops"] / 4, f"{name}: gp3 allows 0.25 MiB/s per provisioned IOPS"
    setup = "\n".join(cluster["worker_setup_commands"])
    assert "mountpoint -q /opt/dlami/nvme" in setup
    assert "export TMPDIR=/opt/dlami/nvme/tmp HF_HOME=/opt/dlami/nvme/hf" in setup
    start = " ".join(cluster["worker_start_ray_commands"])
    assert "--temp-dir=${TMPDIR:-/tmp}/ray" in start


def test_gpu_nodes_check_the_driver_cuda_13_torch_needs(cluster):
    torch = next(c for c in cluster["setup_commands"] if re.search(r"pip install .*\btorch==", c))
    assert "torch==2.13" in torch, "a new torch: check its CUDA build against the AMI's driver, then this test"
    check = next(c for c in cluster["worker_setup_commands"] if "nvidia-smi" in c)
    assert "-ge 580" in check and "exit 1" in check


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


def test_nodes_can_build_and_prebuild_cpu_adam_for_optimizer_offload(cluster):
    """deepspeed.offload_optimizer runs DeepSpeed's CPU Adam, a C++ op: the nodes need a compiler
    and Python's headers (uv's standalone CPython carries them), and the op is built once at setup
    rather than per job, without build isolation, so setuptools must be in the venv."""
    setup = "\n".join(cluster["setup_commands"])
    assert "build-essential" in setup and "uv venv" in setup and "--managed-python" in setup
    assert "DS_BUILD_CPU_ADAM=1" in setup and "deepspeed==" in setup and "setuptools" in setup
    assert setup.index("build-essential") < setup.index("uv venv") < setup.index("setuptools") < \
        setup.index("DS_BUILD_CPU_ADAM=1")


def test_runtime_env_installs_nothing_on_nodes_cluster_yaml_set_up(runtime_env, cluster):
    """No pip/uv/conda section: Ray would build each job a virtualenv on every node, copying the
    whole venv, before it starts. The nodes have the requirements from cluster.yaml's setup."""
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**runtime_env)  # Ray's own validation of every field
    assert set(runtime_env) == {"env_vars", "excludes"}
    setup = " ".join(cluster["setup_commands"])
    assert re.search(r"pip install .*~/incr-ray", setup), "the nodes must install the project with its requirements"


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
