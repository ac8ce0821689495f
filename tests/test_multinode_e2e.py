"""A run on a two-node Ray cluster (head + one more node, both on 127.0.0.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from small_run import small_config

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test needs its own cluster; the shared local Ray restarts afterwards
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_decoder_run_spans_two_nodes(two_node_cluster, tmp_path):
    """Two birds, one (expensive) run: the multi-node placement, and the decoder family — a
    Llama-style model whose config has no pad token (HF pools the last non-pad token)."""
    import ray
    from transformers import AutoConfig, pipeline

    from conftest import build_tiny_model
    from incr_ray.run.loop import run_generations

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    llama = build_tiny_model(tmp_path / "tiny_llama", "llama")
    assert AutoConfig.from_pretrained(llama).pad_token_id is None
    # Two workers of 2 CPUs on nodes of 2 CPUs: one worker per node.
    cfg = small_config(tmp_path, llama, "multinode", method={"k": 2}, data={"synthetic_rows": 900},
                       student={"epochs": 1}, cluster={"workers": 2, "cpus_per_worker": 2},
                       deepspeed={"stage": 2})
    manifest = run_generations(cfg, say=lambda s: None)
    final = Path(cfg.run_dir) / "gen_001" / "model"
    assert AutoConfig.from_pretrained(final).pad_token_id is not None
    out = pipeline("text-classification", model=str(final), device="cpu")(["red words", "blue words here"])
    assert {o["label"] for o in out} <= set(manifest["label_names"])
    gens = manifest["generations"]
    assert [g["status"] for g in gens] == ["finished", "finished"]
    assert all(g["train"]["nodes"] == 2 and g["train"]["workers"] == 2 for g in gens), [g["train"] for g in gens]
    # The teacher's actor pool scored generation 1's block.
    assert gens[1]["rows"] == gens[1]["block_rows"] > 0
    state = json.loads((Path(cfg.run_dir) / "run.json").read_text())
    assert state["status"] == "finished"


def test_a_path_some_node_cannot_see_is_found(two_node_cluster, tmp_path):
    """The multi-node path check asks every node: a path that exists only on the driver's side
    (here: one that exists nowhere, since both nodes share this machine) is reported per node."""
    from incr_ray.run.folder import unreachable_on_nodes

    here = tmp_path / "seen"
    here.touch()
    assert unreachable_on_nodes([str(here)]) == []
    missing = unreachable_on_nodes([str(here), str(tmp_path / "nowhere")])
    assert len(missing) == 2 and {p for _, p in missing} == {str(tmp_path / "nowhere")}
