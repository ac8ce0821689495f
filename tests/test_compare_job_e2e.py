"""`incr-ray compare` as users run it on a cluster: `ray job submit -- python jobs/compare.py` to a
Ray head with token authentication (tests/ray_head.py), 2 variants × 2 seeds as Ray Tune trials.

Its own module and head, apart from test_job_submit_e2e.py: it needs no scenario run, so make test's
scheduler gives it to whichever xdist worker is free while the other carries R1 → R2 → R5.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import yaml

from ray_head import running_head

pytestmark = pytest.mark.e2e

# Apart from test_job_submit_e2e.py's range (20100-20399): the two heads may run at the same time.
WORKER_PORTS = (20400, 20699)


@pytest.fixture(scope="module")
def head():
    with running_head(WORKER_PORTS) as head:
        yield head


@pytest.fixture(scope="module")
def compared(head, tiny_bert, tmp_path_factory):
    """`ray job submit -- python jobs/compare.py`: a one-generation config (a trial costs one fit)
    against a learning rate on 2 seeds — 4 trials, 2 at once on the head's 2 CPUs — plus a grid
    value the config refuses and one whose model does not exist (both fail alone, before Ray starts)."""
    work = tmp_path_factory.mktemp("compare")
    config = work / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"name": "cmp", "seed": 1},
        "storage": {"path": str(work / "runs")},
        "data": {"source": "synthetic", "synthetic_rows": 300, "synthetic_classes": 3, "eval_fraction": 0.2},
        "model": {"base": tiny_bert, "max_length": 16},
        "method": {"k": 1},
        "student": {"epochs": 1, "min_steps": 0, "learning_rate": 1e-2, "batch_size": 16},
        "deepspeed": {"stage": 2},
        "cluster": {"workers": 1, "cpus_per_worker": 1, "use_gpu": False},
        "teacher": {"batch_size": 128, "cpus_per_actor": 1},
        "tracking": {"backend": "mlflow"},
    }))
    args = ("--config", str(config), "--seeds", "2", "--grid", "student.learning_rate=1e-3,-1",
            "--grid", f"model.base={work / 'no-such-model'}")
    started = time.perf_counter()
    job_id, output = head.submit("python", "jobs/compare.py", *args)
    folder = work / "runs" / "cmp"
    return SimpleNamespace(job_id=job_id, output=output, args=args, folder=folder, work=work,
                           summary=json.loads((folder / "compare.json").read_text()),
                           seconds=time.perf_counter() - started)


def test_compare_ran_its_trials_on_tune_in_this_cluster(head, compared):
    assert head.job_details(compared.job_id)["status"] == "SUCCEEDED"
    s = compared.summary
    assert [v["name"] for v in s["variants"]] == ["config", "student.learning_rate=1e-3", "student.learning_rate=-1",
                                                  f"model.base={compared.work / 'no-such-model'}"]
    done = {(t["variant"], t["seed"]): t for t in s["trials"] if t["status"] == "finished"}
    assert sorted(done) == [("config", 1), ("config", 2), ("student.learning_rate=1e-3", 1),
                            ("student.learning_rate=1e-3", 2)]
    assert "up to 2 trial(s) at once" in compared.output
    for line in ("[config-s1] started", "[config-s2] started", "[student.learning_rate=1e-3-s2] started"):
        assert line in compared.output
    # Each trial is a normal run folder with its own seed, the variant's setting and the same holdout per seed.
    for (variant, seed), t in done.items():
        manifest = json.loads((compared.folder / t["name"] / "run.json").read_text())
        assert manifest["status"] == "finished" and manifest["config"]["run"]["seed"] == seed
        lr = 1e-3 if variant != "config" else 1e-2
        assert manifest["config"]["student"]["learning_rate"] == lr
        assert t["metrics"]["accuracy"] == manifest["generations"][0]["metrics"]["accuracy"]
        assert t["holdout_size"] == manifest["data"]["holdout_size"]
    assert done[("config", 1)]["holdout_size"] == done[("student.learning_rate=1e-3", 1)]["holdout_size"]
    assert s["unpaired"] == []


def test_compare_pairs_the_trials_by_seed(compared):
    s = compared.summary
    by = {(t["variant"], t["seed"]): t for t in s["trials"]}
    acc = s["differences"]["student.learning_rate=1e-3"]["accuracy"]
    want = [by[("student.learning_rate=1e-3", seed)]["metrics"]["accuracy"] - by[("config", seed)]["metrics"]["accuracy"]
            for seed in (1, 2)]
    assert acc["diffs"] == pytest.approx(want) and acc["n"] == 2 and acc["lo"] <= acc["mean"] <= acc["hi"]
    md = (compared.folder / "compare.md").read_text()
    assert "| student.learning_rate=1e-3 |" in md and "variant − config" in md
    assert (compared.folder / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_failed_trials_are_reported_with_their_one_line_errors(compared):
    failed = {(t["variant"], t["seed"]): t["error"] for t in compared.summary["trials"] if t["status"] != "finished"}
    assert len(failed) == 4
    refused = failed[("student.learning_rate=-1", 1)]
    assert refused.startswith("config student.learning_rate: Input should be greater than 0")
    missing = failed[(f"model.base={compared.work / 'no-such-model'}", 2)]
    assert "no-such-model" in missing and "\n" not in missing
    assert "| student.learning_rate=-1 | 1 | config student.learning_rate" in (compared.folder / "compare.md").read_text()


def test_compare_logs_a_parent_run_with_each_trial_nested(compared):
    from mlflow.tracking import MlflowClient

    s = compared.summary
    client = MlflowClient(tracking_uri=f"sqlite:///{compared.work / 'runs' / 'mlflow.db'}")
    parent = client.get_run(s["tracking_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["student.learning_rate_1e-3/accuracy_diff"] == pytest.approx(
        s["differences"]["student.learning_rate=1e-3"]["accuracy"]["mean"])
    nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in nested) == sorted(t["name"] for t in s["trials"] if t["status"] == "finished")
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"compare.md", "compare.json", "compare.png"}


def test_compare_again_reads_the_finished_trials_back_without_ray(compared):
    """The same command again: every finished trial is read from its folder, the refused ones are
    refused again before Ray; nothing is left to train, so no Ray starts."""
    from scenarios import cli_run

    code, out = cli_run("compare", *compared.args, timeout=300)
    assert code == 0, out[-3000:]
    again = json.loads((compared.folder / "compare.json").read_text())
    assert "8 trial(s) done or refused, 0 to run" in out and "at once" not in out
    assert [t.get("metrics") for t in again["trials"]] == [t.get("metrics") for t in compared.summary["trials"]]
