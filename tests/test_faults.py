"""The test seam itself: faults chosen in the driver travel with each call, and a worker runs
exactly what it was handed."""

from __future__ import annotations

import pytest

from incr_ray import faults


@pytest.fixture(autouse=True)
def _no_installed_faults(monkeypatch):
    monkeypatch.setattr(faults, "_installed", None)
    monkeypatch.delenv(faults.ENV, raising=False)


def test_injected_faults_are_the_drivers_for_the_block_only():
    assert faults.current() == {}
    with faults.injected(worker_exit_at=[0, 3], once_dir="/x"):
        assert faults.current() == {"worker_exit_at": [0, 3], "once_dir": "/x"}
    assert faults.current() == {}


def test_a_worker_runs_what_it_was_handed_not_its_environment():
    with faults.injected(stop_after_generation=0):
        faults.install({"teacher_exit_at_batch": 3})
        assert faults.current() == {"teacher_exit_at_batch": 3}
        faults.install({})  # a call without faults: none, whatever the environment says
        assert faults.current() == {}


def test_a_scorer_built_outside_ray_leaves_the_process_faults_alone():
    faults.install(None)
    with faults.injected(stop_after_generation=0):
        assert faults.current() == {"stop_after_generation": 0}


def test_training_faults_fire_in_their_generation_and_step_only(tmp_path):
    faults.install({"worker_raise_at": [1, 2]})
    faults.raise_in_worker_at_step(0, 2, rank=0)  # another generation
    faults.raise_in_worker_at_step(1, 1, rank=0)  # another step
    faults.raise_in_worker_at_step(1, 2, rank=1)  # another rank
    with pytest.raises(RuntimeError, match="injected failure at step 2"):
        faults.raise_in_worker_at_step(1, 2, rank=0)


def test_stop_after_generation_never_stops_the_last_one():
    faults.install({"stop_after_generation": 1})
    faults.stop_after_generation(1, k=2)  # the last generation: nothing to stop before
    faults.install({"stop_after_generation": 0})
    with pytest.raises(faults.StopRequested):
        faults.stop_after_generation(0, k=2)
