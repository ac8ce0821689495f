"""`auto` CPUs for training workers and scoring actors, without Ray (the nodes are given)."""

from __future__ import annotations

import pytest

from incr_ray.config import ConfigError, config_from_dict
from incr_ray.generation.resources import cpus_per_bundle, with_cpus


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
    cfg = with_cpus(config_from_dict({"teacher": {"pool_size": 2}}), on_gpu=False, node_cpus=[8.0], say=said.append)
    assert (cfg.cluster.cpus_per_worker, cfg.teacher.cpus_per_actor) == (8, 4.0)
    assert said == ["cluster.cpus_per_worker auto -> 8 for 1 worker(s) (8 CPUs on 1 node(s))",
                    "teacher.cpus_per_actor auto -> 4 for 2 actor(s) (8 CPUs on 1 node(s))"]
    assert with_cpus(cfg, on_gpu=False, node_cpus=[1.0]) is cfg  # resolved already: a no-op

    explicit = config_from_dict({"cluster": {"cpus_per_worker": 3}, "teacher": {"cpus_per_actor": 0.5}})
    assert with_cpus(explicit, on_gpu=False, node_cpus=[8.0]) is explicit
    half = with_cpus(config_from_dict({"cluster": {"cpus_per_worker": 3}}), on_gpu=False, node_cpus=[8.0])
    assert (half.cluster.cpus_per_worker, half.teacher.cpus_per_actor) == (3, 8.0)


def test_gpu_clusters_keep_one_cpu_each():
    cfg = with_cpus(config_from_dict({"cluster": {"workers": 4}}), on_gpu=True, node_cpus=[96.0])
    assert (cfg.cluster.cpus_per_worker, cfg.teacher.cpus_per_actor) == (1, 1.0)


@pytest.mark.parametrize("key, value, message", [
    ("cluster.cpus_per_worker", 0, "config cluster.cpus_per_worker: Input should be 'auto' or greater than or equal to 1 (got 0)"),
    ("cluster.cpus_per_worker", "many", "config cluster.cpus_per_worker: Input should be 'auto' or a valid integer"),
    ("teacher.cpus_per_actor", 0, "config teacher.cpus_per_actor: Input should be 'auto' or greater than 0 (got 0)"),
])
def test_a_bad_cpu_count_is_one_line_for_both_branches(key, value, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, [f"{key}={value}"])
    assert str(err.value).startswith(message) and "more problem" not in str(err.value)
