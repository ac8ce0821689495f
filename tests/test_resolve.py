"""`cluster.interconnect` and `deepspeed.stage: auto` resolved against hand-made cluster facts:
what the GPU nodes' labels say, how many nodes the workers span, and what is said and recorded.

The model is the built-in llama-7b shape (Ψ = 6.61B with a 2-label head, counted on the meta
device); 8 workers on 24 GiB GPUs, 4 × 256 tokens per micro-batch with gradient checkpointing and 4
micro-batches per step: ZeRO-2 does not fit (25.8 GiB), ZeRO-3 and ZeRO-2 with optimizer offload
do (tests/plan/test_recommend.py has the arithmetic on 7e9).
"""

from __future__ import annotations

import pytest

from incr_ray.config import config_from_dict
from incr_ray.resolve import INTERCONNECT_LABEL, ClusterFacts, decide_interconnect, resolve

SEVEN_B = {"model": {"base": "llama-7b", "max_length": 256}, "data": {"labels": ["neg", "pos"]},
           "cluster": {"workers": 8, "use_gpu": True, "gpu_memory_gb": 24},
           "student": {"batch_size": 4, "grad_accum": 4, "gradient_checkpointing": True}}


def two_nodes(label: str) -> ClusterFacts:
    """Two 4-GPU nodes (48 CPUs each) with the given interconnect label, and a CPU head without one."""
    return ClusterFacts((0.0, 48.0, 48.0), gpus=8, attached=True, node_gpus=(0.0, 4.0, 4.0),
                        node_interconnect=("", label, label))


def seven_b(**cluster):
    return config_from_dict({**SEVEN_B, "cluster": {**SEVEN_B["cluster"], **cluster}})


def test_interconnect_auto_reads_the_gpu_nodes_labels():
    assert INTERCONNECT_LABEL == "incr-ray/interconnect"
    assert decide_interconnect("auto", two_nodes("efa"))[0] == "fast"  # the CPU head's missing label does not count
    assert decide_interconnect("auto", two_nodes("tcp"))[0] == "tcp"
    mixed = ClusterFacts((48.0, 48.0), gpus=8, node_gpus=(4.0, 4.0), node_interconnect=("efa", ""))
    fabric, why = decide_interconnect("auto", mixed)
    assert fabric == "tcp" and "a GPU node has no incr-ray/interconnect=efa" in why
    fabric, why = decide_interconnect("auto", ClusterFacts((0.0,), attached=True, node_gpus=(0.0,)))
    assert fabric == "tcp" and "no GPU node is up yet" in why and "cluster.interconnect: fast" in why
    assert decide_interconnect("fast", two_nodes("tcp"))[0] == "fast"  # the setting wins over labels
    assert decide_interconnect("tcp", two_nodes("efa"))[0] == "tcp"


@pytest.mark.parametrize("label, stage, offload", [("efa", 3, False), ("tcp", 2, True)])
def test_stage_auto_over_two_nodes_follows_their_network(label, stage, offload):
    said = []
    cfg = resolve(seven_b(), two_nodes(label), say=said.append)
    assert (cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer) == (stage, offload)
    assert cfg.cluster.interconnect == ("fast" if label == "efa" else "tcp")  # recorded as decided
    line = next(s for s in said if s.startswith("deepspeed.stage auto"))
    if offload:
        assert line.startswith("deepspeed.stage auto -> ZeRO-2 with optimizer offload: 8 workers on 2 nodes without "
                               "a fast interconnect (cluster.interconnect: auto -> tcp)")
        assert "[a GPU node has no incr-ray/interconnect=efa label]" in line
    else:
        assert line.startswith("deepspeed.stage auto -> ZeRO-3: the first stage whose plan fits 24 GiB per GPU")
    assert resolve(cfg, two_nodes(label)) is cfg  # resolved already: unchanged


def test_stage_auto_on_one_node_ignores_the_network():
    one_node = ClusterFacts((96.0,), gpus=8, node_gpus=(8.0,), node_interconnect=("",))
    cfg = resolve(seven_b(), one_node, say=lambda line: None)
    assert (cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer) == (3, False)


def test_stage_auto_before_any_gpu_node_is_up_plans_for_the_worst():
    """An autoscaling cluster with only its CPU head: neither the label nor the GPUs per node can be
    read, so auto plans as if every worker had a node of its own over TCP; `fast` set by hand
    (cluster.yaml's EFA workers) keeps ZeRO-3."""
    head_only = ClusterFacts((0.0,), attached=True, node_gpus=(0.0,), node_interconnect=("",))
    said = []
    cfg = resolve(seven_b(), head_only, say=said.append)
    assert (cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer, cfg.cluster.interconnect) == (2, True, "tcp")
    line = next(s for s in said if s.startswith("deepspeed.stage auto"))
    assert "8 workers on 8 nodes" in line and "no GPU node is up yet" in line and "GPUs per node unknown" in line
    cfg = resolve(seven_b(interconnect="fast"), head_only, say=lambda line: None)
    assert (cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer, cfg.cluster.interconnect) == (3, False, "fast")


def test_an_explicit_stage_or_one_worker_leaves_the_interconnect_alone():
    explicit = resolve(config_from_dict({**SEVEN_B, "deepspeed": {"stage": 3}}), two_nodes("tcp"),
                       say=lambda line: None)
    assert explicit.deepspeed.stage == 3 and explicit.cluster.interconnect == "auto"
    one = resolve(seven_b(workers=1), two_nodes("tcp"), say=lambda line: None)
    assert one.deepspeed.stage == 1 and not one.deepspeed.offload_optimizer and one.cluster.interconnect == "auto"
