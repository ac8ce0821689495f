"""The run folder without Ray: its lock, and the typed manifest with its version check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from incr_ray.config import Config, ConfigError, config_from_dict
from incr_ray.run.folder import RunLock, decide_gpu
from incr_ray.run.manifest import GenerationEntry, Manifest, RunError, check_compatible, load
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
    with pytest.raises(RunError, match="student.min_steps: 100 -> 5"):
        check_compatible(_manifest(old), config_from_dict({"student": {"min_steps": 5}}))
