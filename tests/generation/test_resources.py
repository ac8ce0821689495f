"""`auto` CPUs for training workers and scoring actors, without Ray (the nodes are given), and the
check that a config reaching Ray has none left."""

from __future__ import annotations

import pytest

from incr_ray.config import ConfigError, config_from_dict
from incr_ray.generation.resources import cpus_per_bundle, require_resolved
from incr_ray.resolve import ClusterFacts, resolve

STAGE_2 = {"deepspeed": {"stage": 2}}


@pytest.mark.parametrize("nodes, bundles, cpus", [
    ([2.0], 1, 2),  # a 2-core laptop's one worker trains on both cores
    ([2.0], 2, 1),
    ([2.0], 3, 1),  # more bundles than CPUs: 1 each (Ray queues what does not fit)
    ([16.0], 3, 5),
    ([4.0, 1.0], 2, 2),  # 3 + 2 would not place: the 1-CPU node holds no 2-CPU bundle
    ([4.0, 4.0], 2, 4),
    ([2.5], 1, 2),  # whole CPUs only
    ([0.0], 1, 1),  # a CPU-less head (autoscaling cluster before its workers start)
    ([], 1, 1),
])
def test_cpus_per_bundle_is_the_most_that_places_every_bundle(nodes, bundles, cpus):
    assert cpus_per_bundle(nodes, bundles) == cpus
    if cpus > 1:  # and one more CPU each would not place them all
        assert sum(int(n // (cpus + 1)) for n in nodes) < bundles


def test_auto_is_resolved_and_said_explicit_values_are_kept():
    said = []
    eight = ClusterFacts(node_cpus=(8.0,))
    cfg = resolve(config_from_dict({**STAGE_2, "teacher": {"pool_size": 2}}), eight, say=said.append)
    assert (cfg.cluster.cpus_per_worker, cfg.teacher.cpus_per_actor) == (8, 4.0)
    assert said == ["cluster.cpus_per_worker auto -> 8 for 1 worker(s) (8 CPUs on 1 node(s))",
                    "teacher.cpus_per_actor auto -> 4 for 2 actor(s) (8 CPUs on 1 node(s))"]
    assert resolve(cfg, ClusterFacts(node_cpus=(1.0,))) is cfg  # resolved already: unchanged

    explicit = config_from_dict({**STAGE_2, "cluster": {"cpus_per_worker": 3, "use_gpu": False},
                                 "teacher": {"cpus_per_actor": 0.5}})
    assert resolve(explicit, eight) is explicit
    half = resolve(config_from_dict({**STAGE_2, "cluster": {"cpus_per_worker": 3}}), eight)
    assert (half.cluster.cpus_per_worker, half.teacher.cpus_per_actor) == (3, 8.0)


@pytest.mark.parametrize("node_cpus, node_gpus, cpus", [
    ((96.0,), (4.0,), 24),
    ((8.0, 96.0, 96.0), (0.0, 8.0, 8.0), 12),  # a CPU-only head does not count
    ((0.0, 48.0, 96.0), (0.0, 4.0, 4.0), 12),  # nodes of two sizes: what every worker can have
    ((4.0,), (8.0,), 1),  # fewer CPUs than GPUs: still 1 each
    ((0.0,), (0.0,), 1),  # an autoscaling cluster before its GPU nodes start: 1, said
])
def test_gpu_workers_get_their_nodes_cpus_per_gpu(node_cpus, node_gpus, cpus):
    """CPU Adam (deepspeed.offload_optimizer) runs on a GPU worker's CPUs: Ray sets its OpenMP
    threads to them, and a fixed 1 left it single-threaded. Scoring actors keep 1."""
    said = []
    facts = ClusterFacts(node_cpus, gpus=sum(node_gpus), node_gpus=node_gpus)
    cfg = resolve(config_from_dict({**STAGE_2, "cluster": {"workers": 4, "use_gpu": True}}), facts, say=said.append)
    assert (cfg.cluster.use_gpu, cfg.cluster.cpus_per_worker, cfg.teacher.cpus_per_actor) == (True, cpus, 1.0)
    assert said[0].startswith(f"cluster.cpus_per_worker auto -> {cpus} for 4 worker(s) (")
    if sum(node_gpus):
        assert "CPUs per GPU on the GPU nodes: " in said[0]
    else:
        assert "no GPU node is up yet" in said[0]
    assert said[1] == "teacher.cpus_per_actor auto -> 1 for 1 actor(s) (GPU cluster: the CPUs feed the GPUs)"


def test_what_reaches_ray_must_be_resolved():
    cfg = config_from_dict({"cluster": {"cpus_per_worker": 2}})
    with pytest.raises(ValueError, match=r"^fit_student needs a resolved config \(deepspeed.stage, "
                                         r"teacher.cpus_per_actor: auto\); pass it through incr_ray.resolve.resolve"):
        require_resolved(cfg, "fit_student")
    done = resolve(cfg, ClusterFacts((2.0,)))
    assert require_resolved(done, "score_block") is done


@pytest.mark.parametrize("key, value, message", [
    ("cluster.cpus_per_worker", 0, "config cluster.cpus_per_worker: Input should be 'auto' or greater than or equal to 1 (got 0)"),
    ("cluster.cpus_per_worker", "many", "config cluster.cpus_per_worker: Input should be 'auto' or a valid integer"),
    ("teacher.cpus_per_actor", 0, "config teacher.cpus_per_actor: Input should be 'auto' or greater than 0 (got 0)"),
])
def test_a_bad_cpu_count_is_one_line_for_both_branches(key, value, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, [f"{key}={value}"])
    assert str(err.value).startswith(message) and "more problem" not in str(err.value)
