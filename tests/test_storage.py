"""Files on storage: atomic writes, writability checks, folder renames."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from incr_ray.storage import StorageError, absolute, check_writable, is_remote, read_json, rename_tree, write_json_atomic


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "run.json"
    write_json_atomic(str(p), {"a": 1})
    write_json_atomic(str(p), {"a": 2})
    assert read_json(str(p)) == {"a": 2}
    assert sorted(os.listdir(tmp_path)) == ["run.json"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_storage_fails_early(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(StorageError, match="not writable"):
        check_writable(str(ro / "runs"))


def test_storage_under_a_file_fails_early(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(StorageError, match="not writable"):
        check_writable(str(f / "runs"))


def test_rename_tree_replaces_the_destination(tmp_path):
    (tmp_path / "t.tmp").mkdir()
    (tmp_path / "t.tmp" / "new").write_text("1")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "old").write_text("0")
    rename_tree(str(tmp_path / "t.tmp"), str(tmp_path / "t"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    assert [p.name for p in (tmp_path / "t").iterdir()] == ["new"]


def test_file_uris_are_local_paths(tmp_path):
    assert not is_remote(f"file://{tmp_path}") and not is_remote(str(tmp_path))
    assert is_remote("s3://bucket/runs") and absolute("s3://bucket/runs") == "s3://bucket/runs"
    assert absolute(f"file://{tmp_path}/runs") == str(tmp_path / "runs")


def test_staged_copies_are_keyed_stably_and_dropped(tmp_path, monkeypatch):
    """The staging cache key is a hash every process on a node agrees on (Python's hash() is
    salted per process), and a finished run can drop its copies."""
    import subprocess
    import sys

    from incr_ray.storage import drop_staged, staged_path

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    uri = "s3://bucket/runs/x/gen_000/model"
    here = staged_path(uri)
    code = f"from incr_ray.storage import staged_path; print(staged_path({uri!r}))"
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert str(here) == there and here.is_relative_to(tmp_path)
    here.mkdir(parents=True)
    (here / "model.safetensors").write_bytes(b"x")
    drop_staged([uri])
    assert not here.exists()


# ---------------------------------------------------------------------------------------------
# One copy per node (remote paths on the in-memory s3:// of fake_remote)

from fake_remote import fake_remote, race  # noqa: E402,F401  (the fixture)


def _model_folder(root):
    folder = root / "model"
    (folder / "sub").mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"w" * 1000), ("sub/vocab.txt", b"a\nb")):
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture
def node_tmp(tmp_path, monkeypatch):
    """This node's temporary folder, where staged copies go, private to the test."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node"))
    monkeypatch.setattr("tempfile.tempdir", None)
    (tmp_path / "node").mkdir()
    return tmp_path / "node"


def test_processes_staging_one_model_download_it_once(tmp_path, node_tmp, fake_remote):
    """8 teacher actors on a node stage the same model at once: one downloads, the others wait
    for it and read the same copy."""
    from incr_ray.storage import DONE_MARKER, stage_local, staged_path

    uri = fake_remote.upload(_model_folder(tmp_path), "s3://bucket/runs/r/gen_000/model")
    fake_remote.read_delay = 0.1  # each file read is slow: the callers overlap
    got = race(lambda: stage_local(uri), 6)
    assert got == [str(staged_path(uri))] * 6
    assert sorted(fake_remote.reads.values()) == [1, 1, 1], fake_remote.reads  # each file once
    copy = staged_path(uri)
    assert (copy / "sub" / "vocab.txt").read_bytes() == b"a\nb" and (copy / DONE_MARKER).exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == [copy.name, copy.name + ".lock"]  # no partial left
    assert stage_local(uri) == str(copy) and sum(fake_remote.reads.values()) == 3  # staged: not read again


def test_a_download_cut_short_is_redone_and_dropped_copies_leave_nothing(tmp_path, node_tmp, fake_remote):
    from incr_ray.storage import drop_staged, stage_local, staged_path

    uri = fake_remote.upload(_model_folder(tmp_path), "s3://bucket/m")
    partial = staged_path(uri).with_name(staged_path(uri).name + ".partial")
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")  # a process killed mid-download
    copy = stage_local(uri)
    assert (Path(copy) / "model.safetensors").read_bytes() == b"w" * 1000 and not partial.exists()
    drop_staged([uri])
    assert list(staged_path(uri).parent.iterdir()) == []


@pytest.mark.slow  # starts an interpreter
def test_the_node_lock_dies_with_its_holder(tmp_path):
    """A process killed while it holds the lock (OOM, preemption) does not leave it held."""
    import signal
    import subprocess
    import sys

    from incr_ray.storage import node_lock

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with node_lock(lock, wait=False) as held:
            assert not held
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with node_lock(lock, wait=False) as held:
        assert held


def test_remote_files_are_listed(tmp_path, fake_remote):
    from incr_ray.storage import list_files

    uri = fake_remote.upload(_model_folder(tmp_path), "s3://bucket/m")
    assert list_files(uri) == ["config.json", "model.safetensors"]  # files only, not sub/
    assert list_files("s3://bucket/none") == [] and list_files(str(tmp_path / "none")) == []
    assert list_files(str(tmp_path / "model")) == ["config.json", "model.safetensors"]
