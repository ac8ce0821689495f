"""The run folder without Ray: its lock, the checks before a run (given hand-made cluster facts),
and the typed manifest with its version check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from incr_ray.config import Config, ConfigError, config_from_dict
from incr_ray.resolve import ClusterFacts, decide_gpu, resolve
from incr_ray.run.folder import RunLock, claim_run
from incr_ray.run.manifest import (EXTENSION_SETTINGS, GenerationEntry, Manifest, RunError, check_compatible,
                                   extension_settings, load)
from incr_ray.run.preflight import check_head, preflight, shared_paths
from incr_ray.storage import StorageError
from fake_remote import fake_remote  # noqa: F401  (the fixture)

LAPTOP = ClusterFacts(node_cpus=(2.0,))


def test_lock_refuses_a_second_holder_and_releases(tmp_path):
    with RunLock(str(tmp_path)):
        with pytest.raises(StorageError, match="in use by process"):
            RunLock(str(tmp_path)).acquire()
    RunLock(str(tmp_path)).acquire().release()  # free again after release


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = RunLock(str(tmp_path)).acquire()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_manifest_of_another_version_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"version": 99, "name": "x"}))
    with pytest.raises(RunError, match="manifest version 99.*reads version 1"):
        load(str(path))
    path.write_text(json.dumps({"version": 1, "name": "x"}))
    with pytest.raises(RunError, match="not a valid run manifest"):
        load(str(path))


def test_auto_never_falls_back_to_cpu_on_an_attached_cluster():
    assert decide_gpu("auto", cluster_gpus=4, attached=True) is True
    assert decide_gpu("auto", cluster_gpus=0, attached=False) is False  # a laptop: CPU it is
    with pytest.raises(ConfigError, match="no GPU yet.*use_gpu: true"):
        decide_gpu("auto", cluster_gpus=0, attached=True)
    assert decide_gpu(False, cluster_gpus=0, attached=True) is False
    assert decide_gpu(True, cluster_gpus=0, attached=True) is True


def test_auto_is_resolved_once_and_said():
    said = []
    one = resolve(config_from_dict({}), LAPTOP, say=said.append)
    assert (one.cluster.use_gpu, one.deepspeed.stage, one.cluster.cpus_per_worker, one.teacher.cpus_per_actor) == \
        (False, 0, 2, 2.0)
    assert said == ["deepspeed.stage auto -> ZeRO-0: one worker: nothing to partition",
                    "cluster.cpus_per_worker auto -> 2 for 1 worker(s) (2 CPUs on 1 node(s))",
                    "teacher.cpus_per_actor auto -> 2 for 1 actor(s) (2 CPUs on 1 node(s))"]
    assert resolve(one, LAPTOP, say=said.append) is one and len(said) == 3  # resolved already: unchanged
    explicit = config_from_dict({"deepspeed": {"stage": 2}, "cluster": {"cpus_per_worker": 1},
                                 "teacher": {"cpus_per_actor": 1}})
    assert resolve(explicit, ClusterFacts((8.0,), gpus=1), say=said.append).deepspeed.stage == 2 and len(said) == 3
    unreadable = config_from_dict({"model": {"base": "s3://bucket/model"}, "cluster": {"workers": 4}})
    with pytest.raises(ConfigError, match="cannot read the shape.*set deepspeed.stage"):
        resolve(unreadable, ClusterFacts((8.0,), gpus=4), say=said.append)
    with pytest.raises(ConfigError, match="no GPU yet"):
        resolve(config_from_dict({}), ClusterFacts((8.0,), attached=True))


def test_preflight_checks_the_resolved_precision_and_the_model(tmp_path, tiny_bert):
    storage = {"storage": {"path": str(tmp_path)}, "model": {"base": tiny_bert}}
    cfg, base = preflight(config_from_dict(storage), LAPTOP)
    assert base == tiny_bert and cfg.deepspeed.stage == 0
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        preflight(config_from_dict({**storage, "deepspeed": {"precision": "fp16", "stage": 2}}), LAPTOP)
    gpu, _ = preflight(config_from_dict({**storage, "deepspeed": {"precision": "fp16", "stage": 2}}),
                       ClusterFacts((8.0,), gpus=1))
    assert gpu.cluster.use_gpu is True and (gpu.cluster.cpus_per_worker, gpu.teacher.cpus_per_actor) == (1, 1.0)


def test_zero_3_refuses_a_head_for_another_number_of_labels(tiny_bert, tiny_bert_base):
    zero3 = config_from_dict({"deepspeed": {"stage": 3}, "model": {"base": tiny_bert}})
    with pytest.raises(ConfigError, match="head for 3 labels but the data has 2; ZeRO-3 cannot resize"):
        check_head(zero3, tiny_bert, 2)
    check_head(zero3, tiny_bert, 3)  # the same labels: nothing to resize
    check_head(zero3, tiny_bert_base, 2)  # no head: a new one is made
    check_head(config_from_dict({"deepspeed": {"stage": 2}}), tiny_bert, 2)  # stage 2 resizes it


def test_zero_3_reads_a_remote_base_head_from_storage(tiny_bert, tiny_bert_base, fake_remote):
    """An s3:// base is judged by its config.json, read from storage (not the weights): a head
    for another number of labels would otherwise hang the workers under ZeRO-3."""
    zero3 = config_from_dict({"deepspeed": {"stage": 3}, "model": {"base": "s3://bucket/model"}})
    remote = fake_remote.upload(tiny_bert, "s3://bucket/model")
    with pytest.raises(ConfigError, match="head for 3 labels but the data has 2; ZeRO-3 cannot resize"):
        check_head(zero3, remote, 2)
    check_head(zero3, remote, 3)
    assert set(fake_remote.reads) == {"/bucket/model/config.json"}  # not the weights
    check_head(zero3, fake_remote.upload(tiny_bert_base, "s3://bucket/base"), 2)  # no head: a new one
    with pytest.raises(ConfigError, match=r"^model.base 's3://bucket/none': cannot read its config.json"):
        check_head(zero3, "s3://bucket/none", 2)


def test_only_a_multi_node_cluster_needs_paths_every_node_sees(tmp_path, tiny_bert):
    cfg = config_from_dict({"storage": {"path": str(tmp_path)}})
    two_nodes = ClusterFacts((2.0, 2.0))
    assert shared_paths(cfg, tiny_bert, LAPTOP) == {}
    assert shared_paths(cfg, tiny_bert, two_nodes) == {"storage.path": str(tmp_path), "model.base": tiny_bert}
    assert shared_paths(cfg, "org/hub-model", two_nodes) == {"storage.path": str(tmp_path)}  # fetched per node
    remote = config_from_dict({"storage": {"path": "s3://bucket/runs"}})
    assert shared_paths(remote, "s3://bucket/model", two_nodes) == {}


def test_claim_locks_an_existing_run_and_refuses_changed_settings(tmp_path):
    cfg = config_from_dict({"storage": {"path": str(tmp_path)}})
    with claim_run(cfg) as lock:
        assert lock is None and not (tmp_path / "incr-run").exists()  # a new run: nothing made yet
    folder = tmp_path / "incr-run"
    folder.mkdir()
    (folder / "run.json").write_text(_manifest(Config().to_dict()).model_dump_json())
    with claim_run(cfg) as lock:
        assert lock.held and json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(StorageError, match="in use by process"):
            with claim_run(cfg):
                pass
    assert not (folder / ".lock").exists()
    with pytest.raises(RunError, match=r"method.threshold: 0.9 -> 0.8\); restore them to resume"):
        with claim_run(config_from_dict({"storage": {"path": str(tmp_path)}, "method": {"threshold": 0.8}})):
            pass
    assert not (folder / ".lock").exists()  # released on the refusal too


def _manifest(config: dict, promoted=(None, None, None)) -> Manifest:
    m = Manifest(name="r", run_dir="/r", created="now", config=config, label_names=["a", "b"],
                 data={"fingerprint": "f", "block_sizes": [1, 1, 1], "holdout_size": 1})
    m.generations = [GenerationEntry(index=i, status="finished", model=f"gen_{i:03d}/model", promoted=p)
                     for i, p in enumerate(promoted)]
    return m


def test_the_teacher_is_the_last_promoted_generation():
    m = _manifest({}, promoted=(None, False, True))
    assert m.teacher_of(0) is None
    assert m.teacher_of(1).index == 0
    assert m.teacher_of(2).index == 0  # generation 1 was not promoted: generation 0 teaches on
    assert m.teacher_of(3).index == 2


def test_an_ensemble_is_the_last_n_promoted_generations():
    """teacher.ensemble N: the last N finished, promoted generations before g, oldest first; fewer
    while fewer exist; N = 1 is the teacher itself. A student the gate kept out teaches in none."""
    m = _manifest({}, promoted=(None, False, True, None))
    m.generations.append(GenerationEntry(index=4, status="running"))

    def members(g, n):
        return [e.index for e in m.teacher_members(g, n)]

    assert members(0, 2) == [] and members(1, 2) == [0]
    assert members(3, 2) == [0, 2]  # generation 1 was not promoted
    assert members(4, 2) == [2, 3] and members(4, 3) == [0, 2, 3] and members(4, 9) == [0, 2, 3]
    assert members(5, 2) == [2, 3]  # generation 4 has not finished
    assert all(members(g, 1) == ([m.teacher_of(g).index] if g else []) for g in range(6))


def test_the_ensemble_is_fixed_for_a_resume_and_for_an_extension():
    """How many generations teach is how targets are made: a resume or an extension that changes it
    is refused; a run folder from before the key counts as 1."""
    m = _manifest(Config().to_dict())
    two = config_from_dict({"teacher": {"ensemble": 2}})
    with pytest.raises(RunError, match=r"\(teacher.ensemble: 1 -> 2\); restore them to resume"):
        check_compatible(m, two)
    with pytest.raises(RunError, match=r"\(teacher.ensemble: 1 -> 2\); an extension may change resource settings"):
        check_compatible(m, two, may_change=EXTENSION_SETTINGS)
    check_compatible(m, config_from_dict({"teacher": {"pool_size": 3, "batch_size": 64}}))  # the pool still may
    old = Config().to_dict()
    del old["teacher"]["ensemble"]
    check_compatible(_manifest(old), Config())
    with pytest.raises(RunError, match=r"teacher.ensemble: 1 -> 3"):
        check_compatible(_manifest(old), config_from_dict({"teacher": {"ensemble": 3}}))


def test_settings_a_run_predates_count_as_their_defaults():
    old = Config().to_dict()
    del old["method"]["anneal"], old["student"]["min_steps"]  # written before those keys existed
    check_compatible(_manifest(old), Config())
    with pytest.raises(RunError, match=r"was started with other settings \(student.min_steps: 100 -> 5\); restore them to resume"):
        check_compatible(_manifest(old), config_from_dict({"student": {"min_steps": 5}}))


def test_an_extension_may_change_how_its_generation_trains_and_nothing_else():
    m = _manifest(Config().to_dict())
    gentle = config_from_dict({"student": {"schedule": "run", "learning_rate": 1e-5}})
    with pytest.raises(RunError, match="student.schedule: 'generation' -> 'run'"):
        check_compatible(m, gentle)  # a resumed run may not change it
    check_compatible(m, gentle, may_change=EXTENSION_SETTINGS)  # an extension's new generation may
    assert extension_settings(m, gentle) == {"student.learning_rate": 1e-5, "student.schedule": "run"}
    assert extension_settings(m, Config()) == {}
    with pytest.raises(RunError, match=r"method.threshold: 0.9 -> 0.8\); an extension may change resource settings "
                                       r"and student.epochs, .*student.schedule"):  # targets are made as the run's were
        check_compatible(m, config_from_dict({"method": {"threshold": 0.8}}), may_change=EXTENSION_SETTINGS)
    with pytest.raises(RunError, match="student.init"):
        check_compatible(m, config_from_dict({"student": {"init": "base"}}), may_change=EXTENSION_SETTINGS)


def test_an_extension_may_replay_a_memory_and_balance_its_classes():
    """New classes call for a memory of the old ones: an extension may change replay and balanced
    fine-tuning for its own generation (the run's config stays as it was)."""
    m = _manifest(config_from_dict({"replay": {"fraction": 0.5}}).to_dict())
    memory = config_from_dict({"replay": {"fraction": 0, "per_class": 20, "selection": "herding"},
                               "student": {"balanced_epochs": 2}})
    check_compatible(m, memory, may_change=EXTENSION_SETTINGS)
    assert extension_settings(m, memory) == {"student.balanced_epochs": 2, "replay.fraction": 0,
                                             "replay.per_class": 20, "replay.selection": "herding"}
    m.entry(0).settings = extension_settings(m, memory)
    assert config_from_dict(m.config_of(0)).replay.selection == "herding"
    with pytest.raises(RunError, match="replay.selection: 'uniform' -> 'herding'"):
        check_compatible(m, memory)  # a resumed run may not change it


def test_each_generation_reads_back_the_config_it_trained_with():
    m = _manifest(Config().to_dict())
    m.entry(2).settings = {"student.schedule": "run", "student.learning_rate": 1e-5}
    assert config_from_dict(m.config_of(2)).student.schedule == "run"
    assert config_from_dict(m.config_of(2)).student.learning_rate == 1e-5
    assert config_from_dict(m.config_of(1)).student.schedule == "generation"  # the run's own
    assert m.config["student"]["schedule"] == "generation"  # the run's settings stay as they were


def test_a_fork_keeps_finished_generations_under_its_own_name_and_settings():
    m = _manifest(Config().to_dict(), promoted=(None, None, None))
    m.status, m.final_model, m.final_generation, m.tracking_run_id = "finished", "gen_002/model", 2, "mlflow-run"
    hard = config_from_dict({"run": {"name": "hard"}, "method": {"threshold": 1.0}}).to_dict()
    first = m.forked("hard", "/runs/hard", hard, generations=1)
    assert (first.name, first.run_dir, first.status, first.final_model, first.final_generation) == \
        ("hard", "/runs/hard", "running", None, None)
    assert [e.index for e in first.generations] == [0] and first.config["method"]["threshold"] == 1.0
    assert first.tracking_run_id is None and m.tracking_run_id == "mlflow-run"  # the source is untouched
    first.generations[0].rows = 5
    assert m.generations[0].rows is None
    whole = m.forked("copy", "/runs/copy", m.config)
    assert (whole.status, whole.final_generation, len(whole.generations)) == ("finished", 2, 3)
    m.generations[2].status = "running"
    with pytest.raises(RunError, match="generation 2 unfinished"):
        m.forked("copy", "/runs/copy", m.config)


def test_an_interrupted_extension_is_finished_only_with_its_data_and_settings():
    m = _manifest(Config().to_dict())
    m.status = "finished"
    gentle = {"student.schedule": "run"}
    assert m.begin_extension("new.csv", 0.2, gentle) == 3
    e = m.generations[3]
    assert (m.status, e.status, e.source, e.own_holdout_fraction, e.settings) == \
        ("extending", "pending", "new.csv", 0.2, gentle)
    assert m.begin_extension("new.csv", 0.2, gentle) == 3  # the same extend again finishes it
    with pytest.raises(RunError, match="still being extended with 'new.csv'; run extend with that --data first"):
        m.begin_extension("other.csv", 0.2, gentle)
    with pytest.raises(RunError, match="started with student.schedule=run, not the run's own settings; "
                                       "pass the same --set to finish it"):
        m.begin_extension("new.csv", 0.2, {})
    assert len(m.generations) == 4
