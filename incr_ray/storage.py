"""The run folder on storage: its layout, the atomic manifest, the run lock, and file transfer.

A run folder is a local path (or NFS mount) or a URI pyarrow can open (s3://, gs://). Local paths
get the full treatment (atomic rename, a lock file); on object stores a write is already atomic
per object and the lock is skipped (documented in the README).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "run.json"
LOCK = ".lock"
DONE_MARKER = "_DONE"


class StorageError(RuntimeError):
    """Storage is unusable (unwritable, full, locked); one line."""


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _fs_and_path(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


@dataclass(frozen=True)
class RunPaths:
    """Where each artefact of a run lives (DESIGN.md §3)."""

    root: str

    def join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def manifest(self) -> str:
        return self.join(MANIFEST)

    @property
    def split(self) -> str:
        return self.join("split")

    def gen(self, g: int) -> str:
        return self.join(f"gen_{g:03d}")

    def model(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "model")

    def targets(self, g: int) -> str:
        return self.join(f"gen_{g:03d}", "targets")

    @property
    def ray_train(self) -> str:
        return self.join("_ray_train")


def absolute(path: str) -> str:
    return path if is_remote(path) else str(Path(path).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# Files


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    import pyarrow.fs as pafs

    fs, p = _fs_and_path(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_json(path: str) -> Any:
    if not is_remote(path):
        return json.loads(Path(path).read_text(encoding="utf-8"))
    fs, p = _fs_and_path(path)
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    """Write then rename, so a reader (or a crash) never sees half a manifest."""
    data = json.dumps(obj, indent=2, sort_keys=False).encode("utf-8")
    write_bytes_atomic(path, data)


def write_bytes_atomic(path: str, data: bytes) -> None:
    if is_remote(path):
        fs, p = _fs_and_path(path)
        with fs.open_output_stream(p) as f:  # one PUT: object stores publish it whole
            f.write(data)
        return
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def remove_tree(path: str) -> None:
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = _fs_and_path(path)
    try:
        fs.delete_dir(p)
    except FileNotFoundError:
        pass


def rename_tree(src: str, dest: str) -> None:
    """Move a finished temporary folder into place (replacing ``dest``).

    Local: one atomic rename. Object stores have no folder rename: copy, then delete the source;
    readers rely on run.json, which names ``dest`` only after this returns.
    """
    remove_tree(dest)
    if not is_remote(src):
        os.replace(src, dest)
        return
    import pyarrow.fs as pafs

    fs, s = _fs_and_path(src)
    _, d = _fs_and_path(dest)
    pafs.copy_files(s, d, source_filesystem=fs, destination_filesystem=fs)
    fs.delete_dir(s)


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a local folder to ``dest`` (replacing it); the caller marks it done afterwards."""
    remove_tree(dest)
    if not is_remote(dest):
        shutil.copytree(local_dir, dest)
        return
    import pyarrow.fs as pafs

    fs, p = _fs_and_path(dest)
    pafs.copy_files(local_dir, p, destination_filesystem=fs)


def stage_local(path: str) -> str:
    """A local folder with the contents of ``path`` (downloaded once per process if remote)."""
    if not is_remote(path):
        return path
    import pyarrow.fs as pafs

    cache = Path(tempfile.gettempdir()) / "incr_ray_models" / str(abs(hash(path)))
    if not (cache / DONE_MARKER).exists():
        shutil.rmtree(cache, ignore_errors=True)
        fs, p = _fs_and_path(path)
        pafs.copy_files(p, str(cache), source_filesystem=fs)
        (cache / DONE_MARKER).write_text("ok")
    return str(cache)


# ---------------------------------------------------------------------------------------------
# Checks and the run lock


def check_writable(folder: str) -> None:
    """Fail now, not after an hour of training, when the storage folder cannot take files."""
    if is_remote(folder):
        return  # permissions on object stores show at the first write; nothing cheap to probe
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe-")
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.unlink(probe)
    except OSError as err:
        raise StorageError(
            f"storage.path {folder!r} is not writable ({err.strerror}); pick a folder you can write to"
        ) from None
    free = shutil.disk_usage(folder).free
    if free < 200 * 2**20:
        raise StorageError(
            f"storage.path {folder!r} has only {free // 2**20} MiB free; a run needs room for its "
            "models (at least 200 MiB for tiny ones); free space or pick another folder"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """One process at a time per run folder. A lock whose owner died (same host) is taken over."""

    def __init__(self, run_dir: str):
        self.path = run_dir.rstrip("/") + "/" + LOCK
        self.held = False

    def acquire(self) -> "RunLock":
        if is_remote(self.path):
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(Path(self.path).read_text())
                except (OSError, ValueError):
                    owner = {}
                same_host = owner.get("host") == socket.gethostname()
                if same_host and not _pid_alive(int(owner.get("pid", -1))):
                    os.unlink(self.path)  # stale: its process is gone
                    continue
                raise StorageError(
                    f"run folder {os.path.dirname(self.path)!r} is in use by process "
                    f"{owner.get('pid')} on {owner.get('host')}; wait for it to finish, or if that "
                    f"process is gone delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise StorageError(f"could not take the lock {self.path}; delete it if no run is active")

    def release(self) -> None:
        if self.held:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
