"""Files on storage, local or remote alike: a local path (or NFS mount) or a URI pyarrow can open
(s3://, gs://).

Local paths get atomic renames; on object stores a single write is already atomic per object and
a folder "rename" is a copy then a delete (readers rely on run.json, which names a folder only
once it is complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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


def staged_path(uri: str) -> Path:
    """Where :func:`stage_local` keeps its copy of ``uri`` on this node."""
    return Path(tempfile.gettempdir()) / "incr_ray_models" / hashlib.sha256(uri.encode()).hexdigest()[:32]


def drop_staged(uris: list[str]) -> None:
    """Remove this node's staged copies of ``uris`` (a run's models, once the run is done with them)."""
    for uri in uris:
        shutil.rmtree(staged_path(uri), ignore_errors=True)


def stage_local(path: str) -> str:
    """A local folder with the contents of ``path``: ``path`` itself when local, else a copy in a
    per-node cache keyed by a stable hash of the URI, shared by every process on the node.

    The copy lands in a private temporary folder and is renamed into place, so concurrent
    processes never see half a model; the first rename wins and the others drop their copy.
    """
    if not is_remote(path):
        return path
    cache = staged_path(path)
    cache_root = cache.parent
    if (cache / DONE_MARKER).exists():
        return str(cache)
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".staging-"))
    try:
        fs, p = _fs_and_path(path)
        pafs.copy_files(p, str(tmp), source_filesystem=fs)
        (tmp / DONE_MARKER).write_text("ok")
        try:
            os.rename(tmp, cache)
        except OSError:  # another process on this node finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
