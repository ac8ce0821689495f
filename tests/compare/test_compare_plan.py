"""incr-ray compare's plan, before Ray: the variants, their trials and run folders, what is refused
at once and what fails only its own variant, and how many runs the cluster holds at once."""

from __future__ import annotations

import pytest

from incr_ray.compare.plan import AGAINST, parse_against, parse_grid, plan_compare, runs_at_once, trial_name
from incr_ray.config import ConfigError, config_from_dict

RAW = {"run": {"name": "cmp", "seed": 5}, "storage": {"path": "/data/runs"}, "method": {"k": 3},
       "student": {"learning_rate": 1e-4}}


def test_every_variant_runs_on_the_same_seeds_in_its_own_run_folder():
    plan = plan_compare(RAW, [], 3, "full,sequential", ["student.learning_rate=1e-4,3e-4"])
    assert [v.name for v in plan.variants] == ["config", "full", "sequential", "student.learning_rate=3e-4"]
    assert plan.seeds == [5, 6, 7] and plan.folder == "/data/runs/cmp"
    assert len(plan.trials) == 12 and len({t.name for t in plan.trials}) == 12
    by = {(t.variant, t.seed): t.config for t in plan.trials}
    for (variant, seed), cfg in by.items():
        assert cfg.run.seed == seed and cfg.storage.path == "/data/runs/cmp" and cfg.run_dir.startswith("/data/runs/cmp/")
    assert by[("config", 6)].method.k == 3 and by[("full", 6)].method.k == 1
    assert by[("sequential", 6)].method.threshold == 1.0 and by[("sequential", 6)].method.k == 3
    assert by[("student.learning_rate=3e-4", 7)].student.learning_rate == 3e-4
    # Everything else is the config's own.
    base, full = by[("config", 5)].to_dict(), by[("full", 5)].to_dict()
    assert {k: v for k, v in full["method"].items() if k != "k"} == {k: v for k, v in base["method"].items() if k != "k"}
    assert full["student"] == base["student"] and full["data"] == base["data"]


def test_a_grid_value_equal_to_the_config_is_the_configs_own_run():
    plan = plan_compare(RAW, ["method.threshold=0.8"], 2, None, ["method.threshold=0.8,0.95,0.95"])
    assert [v.name for v in plan.variants] == ["config", "method.threshold=0.95"]


def test_a_value_the_config_refuses_fails_only_its_own_variant():
    plan = plan_compare(RAW, [], 2, None, ["method.threshold=0.95,1.5"])
    bad = [t for t in plan.trials if t.variant == "method.threshold=1.5"]
    assert len(bad) == 2 and all(t.config is None and "method.threshold" in t.error for t in bad)
    assert all(t.config is not None and t.error is None for t in plan.trials if t not in bad)


@pytest.mark.parametrize("seeds, against, grid, sets, needle", [
    (1, None, [], [], "at least 2 seeds"),
    (3, "fll", [], [], "choose from full, sequential"),
    (3, None, ["student.lr=1,2"], [], "unknown key 'lr'"),
    (3, None, ["student=1,2"], [], "is a section"),
    (3, None, ["student.learning_rate"], [], "expected KEY=V1,V2"),
    (3, None, ["student.learning_rate=1e-4,,2e-4"], [], "an empty value"),
    (3, None, [], ["method.k=0"], "method.k"),  # the config itself: nothing to compare against
])
def test_bad_arguments_are_refused_before_any_trial(seeds, against, grid, sets, needle):
    with pytest.raises(ConfigError) as err:
        plan_compare(RAW, sets, seeds, against, grid)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_parsers():
    assert parse_against("full, sequential,full") == ["full", "sequential"] and parse_against(None) == []
    assert set(AGAINST) == {"full", "sequential"}
    assert parse_grid(["method.threshold=0.8, 0.95"]) == [("method.threshold", ["0.8", "0.95"])]


def test_trial_names_are_plain_distinct_folder_names():
    assert trial_name("config", 0) == "config-s0"
    odd = trial_name("model.base=/models/a b", 2)
    assert "/" not in odd and " " not in odd and odd.endswith("-s2")
    assert odd != trial_name("model.base=/models/a_b", 2)  # a hash tells apart what the slug merges
    assert len(trial_name("x" * 200, 1)) < 70
    config_from_dict({"run": {"name": odd}})  # a valid run.name


def test_runs_at_once_is_what_the_larger_stage_of_one_run_leaves_room_for():
    cpu = config_from_dict({"cluster": {"use_gpu": False, "workers": 2, "cpus_per_worker": 2},
                            "teacher": {"pool_size": 1, "cpus_per_actor": 3}})
    assert runs_at_once(cpu, {"CPU": 16}) == 4  # training needs 4 CPUs, scoring 3
    assert runs_at_once(cpu, {"CPU": 3}) == 1  # never 0: one run waits for what it needs
    gpu = config_from_dict({"cluster": {"use_gpu": True, "workers": 4, "cpus_per_worker": 8},
                            "teacher": {"pool_size": 2, "gpus_per_actor": 1.0, "cpus_per_actor": 1}})
    assert runs_at_once(gpu, {"CPU": 192, "GPU": 16}) == 4  # GPUs decide
    assert runs_at_once(gpu, {"CPU": 48, "GPU": 16}) == 1  # CPUs decide
