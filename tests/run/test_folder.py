"""The run folder without Ray: its lock, and the typed manifest with its version check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from incr_ray.config import Config, ConfigError, config_from_dict
from incr_ray.run.folder import RunLock, decide_gpu
from incr_ray.run.manifest import (EXTENSION_SETTINGS, GenerationEntry, Manifest, RunError, check_compatible,
                                   extension_settings, load)
from incr_ray.storage import StorageError


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


def test_stage_auto_is_resolved_once_and_said():
    from incr_ray.config import config_from_dict
    from incr_ray.run.folder import with_stage

    said = []
    one = with_stage(config_from_dict({}), on_gpu=False, say=said.append)
    assert one.deepspeed.stage == 0 and said == ["deepspeed.stage auto -> ZeRO-0: one worker: nothing to partition"]
    explicit = config_from_dict({"deepspeed": {"stage": 2}})
    assert with_stage(explicit, on_gpu=True, say=said.append) is explicit and len(said) == 1
    unreadable = config_from_dict({"model": {"base": "s3://bucket/model"}, "cluster": {"workers": 4}})
    with pytest.raises(ConfigError, match="cannot read the shape.*set deepspeed.stage"):
        with_stage(unreadable, on_gpu=True, say=said.append)


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


def test_each_generation_reads_back_the_config_it_trained_with():
    m = _manifest(Config().to_dict())
    m.entry(2).settings = {"student.schedule": "run", "student.learning_rate": 1e-5}
    assert config_from_dict(m.config_of(2)).student.schedule == "run"
    assert config_from_dict(m.config_of(2)).student.learning_rate == 1e-5
    assert config_from_dict(m.config_of(1)).student.schedule == "generation"  # the run's own
    assert m.config["student"]["schedule"] == "generation"  # the run's settings stay as they were


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
