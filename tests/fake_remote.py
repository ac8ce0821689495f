"""An ``s3://`` for tests: fsspec's in-memory filesystem behind pyarrow, where
:mod:`incr_ray.storage` opens every remote path, so remote reads and writes run for real here
(no network, no credentials). It counts the files read, and can make each read slow, so that
processes racing for one download overlap.

Use the ``fake_remote`` fixture (import it into the test module)."""

from __future__ import annotations

import collections
import threading
import time
import uuid
from pathlib import Path

import fsspec
import pyarrow.fs as pafs
import pytest


class _CountingHandler(pafs.FSSpecHandler):
    def __init__(self, fs, remote: "FakeRemote"):
        super().__init__(fs)
        self.remote = remote

    def _read(self, path: str) -> None:
        with self.remote.lock:
            self.remote.reads[path.removeprefix(self.remote.root)] += 1
        time.sleep(self.remote.read_delay)

    def open_input_stream(self, path):
        self._read(path)
        return super().open_input_stream(path)

    def open_input_file(self, path):
        self._read(path)
        return super().open_input_file(path)


class FakeRemote:
    """``s3://<bucket>/<key>`` -> ``<root>/<bucket>/<key>`` in fsspec's memory filesystem."""

    def __init__(self):
        self.root = f"/fake-s3-{uuid.uuid4().hex[:12]}"
        self.memory = fsspec.filesystem("memory")
        self.filesystem = pafs.PyFileSystem(_CountingHandler(self.memory, self))
        self.reads: collections.Counter[str] = collections.Counter()  # "/bucket/key" -> times read
        self.read_delay = 0.0
        self.lock = threading.Lock()

    def fs_and_path(self, uri: str):
        scheme, _, rest = uri.partition("://")
        assert scheme == "s3", uri
        return self.filesystem, f"{self.root}/{rest.rstrip('/')}"

    def upload(self, local: str | Path, uri: str) -> str:
        """Copy a local folder to ``uri``; returns ``uri``."""
        _, path = self.fs_and_path(uri)
        pafs.copy_files(str(local), path, destination_filesystem=self.filesystem)
        return uri

    def close(self) -> None:
        if self.memory.exists(self.root):
            self.memory.rm(self.root, recursive=True)


@pytest.fixture
def fake_remote(monkeypatch):
    import incr_ray.storage

    remote = FakeRemote()
    monkeypatch.setattr(incr_ray.storage, "_fs_and_path", remote.fs_and_path)
    yield remote
    remote.close()


def race(call, callers: int) -> list:
    """``call()`` from ``callers`` threads at once (processes on one node sharing a download);
    their results. Any caller's error fails the test."""
    got, errors = [], []

    def one():
        try:
            got.append(call())
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return got
