"""Files on storage: atomic writes, writability checks, folder renames."""

from __future__ import annotations

import os

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
