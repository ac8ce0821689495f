"""Student training around the recipe: the seeded training order, and a worker's scratch on its
node (one checkpoint copy per node, the sweep of what dead workers left)."""

from __future__ import annotations

import numpy as np

import pytest

from incr_ray.generation.student import shuffled_for_training
from incr_ray.method.hashing import shuffle_keys


@pytest.mark.parametrize("local_rows", [10_000, 0], ids=["in memory", "ray data sort"])
def test_training_rows_are_shuffled_reproducibly(ray_local, local_rows):
    """A class-sorted block (like Rotten Tomatoes' file order) reaches training well mixed, the
    same way for the same seed, with every row exactly once."""
    import ray

    rows = [{"row_id": i, "label": 0 if i < 300 else 1} for i in range(600)]
    ds = ray.data.from_items(rows, override_num_blocks=4)

    def order(ds, seed):
        return [r["row_id"] for r in shuffled_for_training(ds, seed, rows=600, local_rows=local_rows).take_all()]

    first, again, other = order(ds, 7), order(ds, 7), order(ds, 8)
    assert sorted(first) == list(range(600))
    assert first == again
    assert first != other
    # The same rows cut into other blocks and arriving in another order (as a teacher pool's
    # output does between runs) train in the same order: a resumed run matches an unbroken one.
    relaid = ray.data.from_items(rows[::-1], override_num_blocks=7)
    assert order(relaid, 7) == first
    labels = np.array([0 if i < 300 else 1 for i in first])
    # Sorted input has one switch between classes; a shuffle has about n/2.
    assert (labels[1:] != labels[:-1]).sum() > 200
    assert abs(labels[:100].mean() - 0.5) < 0.2  # the first batches already hold both classes
    # Both ways give one order: by the seeded key, then the row id (the key alone, as sorted here).
    keys = shuffle_keys(np.arange(600), 7)
    assert first == sorted(range(600), key=lambda i: (keys[i], i))


def test_fit_student_refuses_an_unresolved_stage():
    """``deepspeed.stage: auto`` is resolved once per run (``incr_ray.resolve``); a direct caller that
    skips it is told so, instead of a KeyError in the worker."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.student import StudentRequest, fit_student

    cfg = config_from_dict({"cluster": {"cpus_per_worker": 1}, "teacher": {"cpus_per_actor": 1}})
    request = StudentRequest(generation=0, init_model="m", label_names=["a", "b"], rows=10, model_dest="d",
                             ray_storage="r")
    with pytest.raises(ValueError, match=r"fit_student needs a resolved config \(deepspeed.stage: auto\).*incr_ray.resolve"):
        fit_student(cfg, request, None, on_gpu=False)


# ---------------------------------------------------------------------------------------------
# A worker's scratch on its node, below Ray

from fake_remote import fake_remote, race  # noqa: E402,F401  (the fixture)


def _hf_checkpoint(root):
    """A Ray Train checkpoint folder as _ReportCheckpoint leaves it: HF's folder under checkpoint/."""
    hf = root / "checkpoint_000001" / "checkpoint"
    (hf / "global_step2").mkdir(parents=True)
    (hf / "trainer_state.json").write_text('{"global_step": 2}')
    for rank in (0, 1):
        (hf / "global_step2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"o" * 100)
    return root / "checkpoint_000001"


def test_ranks_resuming_from_remote_storage_share_one_download(tmp_path, fake_remote):
    """The 8 ranks of a node resume at once: one downloads the checkpoint, the others wait for it
    and read the same copy; the node's copy goes once every rank is past its resume."""
    from incr_ray.generation.scratch import checkpoint_on_node, owner_alive
    from incr_ray.storage import drop_copy

    uri = fake_remote.upload(_hf_checkpoint(tmp_path / "storage"), "s3://bucket/ray/gen_000-1/checkpoint_000001")
    fs, path = fake_remote.fs_and_path(uri)
    node = tmp_path / "node"
    node.mkdir()
    fake_remote.read_delay = 0.1  # the ranks overlap
    got = race(lambda: checkpoint_on_node(path, fs, root=str(node)), 4)
    assert len(set(got)) == 1
    folder, copy = got[0]
    assert sorted(fake_remote.reads.values()) == [1, 1, 1], fake_remote.reads  # each file once, not once per rank
    assert (copy / "checkpoint" / "trainer_state.json").is_file() and owner_alive(copy)
    assert sorted(p.name for p in node.iterdir()) == [copy.name, copy.name + ".lock"]
    drop_copy(copy)
    assert list(node.iterdir()) == []


def test_a_checkpoint_on_local_storage_is_read_in_place(tmp_path):
    import pyarrow.fs as pafs

    from incr_ray.generation.scratch import checkpoint_on_node

    ckpt = _hf_checkpoint(tmp_path)
    assert checkpoint_on_node(str(ckpt), pafs.LocalFileSystem(), root=str(tmp_path / "node")) == (str(ckpt), None)
    assert not (tmp_path / "node").exists()


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow  # starts an interpreter (a process that is gone)
def test_the_sweep_removes_what_dead_workers_left_and_keeps_the_living(tmp_path):
    """Workers killed by the OOM killer or a preemption never run their finally: the next worker
    on the node removes their folders and the checkpoint copies nobody alive reads."""
    import os

    from incr_ray.generation.scratch import OWNER, record_owner, sweep_stale_scratch
    from incr_ray.storage import node_lock

    dead = _dead_pid()

    def folder(name, owner):
        path = tmp_path / name
        (path / "model").mkdir(parents=True)
        if owner == "me":
            record_owner(path)
        elif owner is not None:
            (path / OWNER).write_text(owner)
        return path

    gone = folder("incr-ray-g0-r1-abc", f"{dead}")
    reused = folder("incr-ray-g1-r0-def", f"{os.getpid()} 1")  # our pid, another process's start time
    mine = folder("incr-ray-g0-r0-ghi", "me")
    unowned = folder("incr-ray-g2-r0-jkl", None)  # being made, or left by an older incr-ray
    other = folder("unrelated-g0-r1-x", f"{dead}")
    stale_copy = folder("incr-ray-resume-0123", f"{dead}")
    (tmp_path / "incr-ray-resume-0123.lock").touch()
    cut_short = tmp_path / "incr-ray-resume-4567.partial"  # its download was killed: no copy, no owner
    cut_short.mkdir()
    (tmp_path / "incr-ray-resume-4567.lock").touch()
    live_copy = folder("incr-ray-resume-89ab", "me")
    (tmp_path / "incr-ray-resume-89ab.lock").touch()
    busy = folder("incr-ray-resume-cdef", f"{dead}")  # a live process holds its lock: a download under way
    with node_lock(tmp_path / "incr-ray-resume-cdef.lock"):
        removed = sweep_stale_scratch(str(tmp_path))
    assert sorted(removed) == sorted(map(str, (gone, reused, stale_copy, tmp_path / "incr-ray-resume-4567")))
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {mine.name, unowned.name, other.name, live_copy.name, busy.name,
                    "incr-ray-resume-89ab.lock", "incr-ray-resume-cdef.lock"}
