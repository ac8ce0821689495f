"""Files on storage, local or remote alike: a local path (or NFS mount) or a URI pyarrow can open
(s3://, gs://).

Local paths get atomic renames; on object stores a single write is already atomic per object and
a folder "rename" is a copy then a delete (readers rely on run.json, which names a folder only
once it is complete).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow.fs as pafs

DONE_MARKER = "_DONE"


class StorageError(RuntimeError):
    """Storage is unusable (unwritable, full, locked); one line."""


def is_remote(path: str) -> bool:
    """The one test of "is this remote?": a URI other than file://."""
    return "://" in path and not path.startswith("file://")


def _fs_and_path(uri: str):
    return pafs.FileSystem.from_uri(uri)


def absolute(path: str) -> str:
    """A remote URI as it is; a local path (file:// URIs included) as an absolute path."""
    if is_remote(path):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


# ---------------------------------------------------------------------------------------------
# Files


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs_and_path(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        return Path(path).read_bytes()
    fs, p = _fs_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def parquet_batches(path: str, columns: list[str], batch_size: int):
    """The pyarrow RecordBatches of a Parquet file or folder, local or remote, streamed
    ``batch_size`` rows at a time; of ``columns``, those the files hold (a run folder written by an
    older incr-ray may lack one)."""
    import pyarrow.dataset as pads

    if is_remote(path):
        fs, p = _fs_and_path(path)
        dataset = pads.dataset(p, format="parquet", filesystem=fs)
    else:
        dataset = pads.dataset(path, format="parquet")
    return dataset.to_batches(columns=[c for c in columns if c in dataset.schema.names], batch_size=batch_size)


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path).decode("utf-8"))


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
    os.makedirs(d, exist_ok=True)
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
    fs, p = _fs_and_path(dest)
    pafs.copy_files(local_dir, p, destination_filesystem=fs)


def list_files(path: str) -> list[str]:
    """The names of the files directly in the folder ``path``, local or remote (none when it is missing)."""
    if not is_remote(path):
        return sorted(e.name for e in os.scandir(path) if e.is_file()) if os.path.isdir(path) else []
    fs, p = _fs_and_path(path)
    infos = fs.get_file_info(pafs.FileSelector(p, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)


# ---------------------------------------------------------------------------------------------
# One copy per node


@contextmanager
def node_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock every process on this node agrees on: ``flock`` on the file ``path``
    (made when missing), released when its holder exits, however it exits (a killed process
    leaves no stale lock). Yields whether it holds the lock: always with ``wait``, else only when
    no other process held it.

    The holder may delete ``path``: a process that got the lock on a file since unlinked tries again
    on the new one, so two processes never both hold "the" lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was replaced or deleted while we waited
    try:
        yield True
    finally:
        os.close(fd)


def lock_path(folder: Path) -> Path:
    """The lock file beside a node-local copy ``folder`` (see :func:`fetch_once`)."""
    return folder.with_name(folder.name + ".lock")


def fetch_once(dest: Path, fetch: Callable[[str], None], claim: Callable[[Path], None] | None = None) -> Path:
    """``dest``, filled by ``fetch(folder)`` once per node, however many processes ask at once.

    The first to take the lock beside ``dest`` downloads; the others wait for it and then read the
    same folder (8 teacher actors or 8 training ranks on a node: one download, not 8). The download
    lands in ``<dest>.partial``, is marked complete (``_DONE``) and renamed into place, so ``dest``
    is only ever whole; a download cut short (the process killed) is redone by the next process.
    ``claim(dest)``, when given, runs under the lock once ``dest`` is there (to record a reader
    before anyone may remove it).
    """
    if claim is None and (dest / DONE_MARKER).exists():
        return dest
    with node_lock(lock_path(dest)):
        if not (dest / DONE_MARKER).exists():
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(dest, ignore_errors=True)
            partial.mkdir(parents=True)
            try:
                fetch(str(partial))
                (partial / DONE_MARKER).write_text("ok")
                os.rename(partial, dest)
            finally:
                shutil.rmtree(partial, ignore_errors=True)
        if claim is not None:
            claim(dest)
    return dest


def drop_copy(dest: Path) -> None:
    """Remove a node-local copy made by :func:`fetch_once`, its lock file included, under its lock."""
    lock = lock_path(dest)
    if not lock.exists() and not dest.exists():
        return
    with node_lock(lock):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(dest.with_name(dest.name + ".partial"), ignore_errors=True)
        lock.unlink(missing_ok=True)


def staged_path(uri: str) -> Path:
    """Where :func:`stage_local` keeps its copy of ``uri`` on this node."""
    return Path(tempfile.gettempdir()) / "incr_ray_models" / hashlib.sha256(uri.encode()).hexdigest()[:32]


def drop_staged(uris: list[str]) -> None:
    """Remove this node's staged copies of ``uris`` (a run's models, once the run is done with them)."""
    for uri in uris:
        drop_copy(staged_path(uri))


def download_tree(path: str, dest: str) -> None:
    """Copy the remote folder ``path`` into the local folder ``dest``."""
    fs, p = _fs_and_path(path)
    pafs.copy_files(p, dest, source_filesystem=fs)


def stage_local(path: str) -> str:
    """A local folder with the contents of ``path``: ``path`` itself when local, else a copy in a
    per-node cache keyed by a stable hash of the URI, shared by every process on the node.

    One process per node downloads (:func:`fetch_once`, a lock per URI); the others wait for it
    and read the same copy, which stays complete-or-absent.
    """
    if not is_remote(path):
        return path
    return str(fetch_once(staged_path(path), lambda into: download_tree(path, into)))


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
