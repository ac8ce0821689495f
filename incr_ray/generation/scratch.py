"""A training worker's scratch on its node, Ray-free: its own folder (``incr-ray-g<g>-r<rank>-*`` in
the temporary folder, with its owner's pid), and, when a restarted group resumes from a checkpoint on
remote storage, one copy of that checkpoint per node (:func:`checkpoint_on_node`). A worker killed by
the OOM killer, a preemption or Ray never runs its ``finally``: each worker sweeps what dead ones
left (:func:`sweep_stale_scratch`) when it starts and when it ends (:mod:`incr_ray.generation.student`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from ..storage import fetch_once, node_lock


WORKER_FOLDER = "incr-ray-g{generation}-r{rank}-"  # + mkdtemp's suffix, in the temporary folder
RESUME_COPY = "incr-ray-resume-"  # + a hash of the checkpoint's path: one per node
OWNER = "pid"  # in each of both: "<pid> <start time>" of the process that owns it


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has exited


def record_owner(folder: Path) -> None:
    """Write this process as ``folder``'s owner: its pid and start time."""
    (folder / OWNER).write_text(f"{os.getpid()} {_start_time(os.getpid()) or ''}".strip())


def owner_alive(folder: Path) -> bool | None:
    """Whether the process recorded in ``folder`` still runs; None when none is recorded."""
    try:
        pid, *start = (folder / OWNER).read_text().split()
    except (OSError, ValueError):
        return None
    if os.path.isdir("/proc"):
        now = _start_time(int(pid))
        return now is not None and (not start or now == start[0])
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def worker_folder(generation: int, rank: int) -> str:
    """A new scratch folder for this worker, owned by this process."""
    work = tempfile.mkdtemp(prefix=WORKER_FOLDER.format(generation=generation, rank=rank))
    record_owner(Path(work))
    return work


def sweep_stale_scratch(root: str | None = None) -> list[str]:
    """Remove what dead training workers left in this node's temporary folder ``root``: their
    folders (each holds a copy of its generation's model), and checkpoint copies whose last reader
    is gone or whose download was cut short. Folders of live processes, and folders with no owner
    recorded (being made, or older), stay. Returns the removed paths."""
    root_dir = Path(root or tempfile.gettempdir())
    removed = []
    for folder in root_dir.glob(WORKER_FOLDER.format(generation="*", rank="*") + "*"):
        if folder.is_dir() and owner_alive(folder) is False:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    for lock in root_dir.glob(f"{RESUME_COPY}*.lock"):
        copy = lock.with_name(lock.name.removesuffix(".lock"))
        try:
            with node_lock(lock, wait=False) as held:  # held elsewhere: a download or a claim under way
                if held and not owner_alive(copy):
                    shutil.rmtree(copy, ignore_errors=True)
                    shutil.rmtree(copy.with_name(copy.name + ".partial"), ignore_errors=True)
                    lock.unlink(missing_ok=True)
                    removed.append(str(copy))
        except OSError:
            continue
    return removed


def checkpoint_on_node(path: str, filesystem: pafs.FileSystem, root: str | None = None) -> tuple[str, Path | None]:
    """(a local folder with the checkpoint at ``path`` on ``filesystem``, the node's copy or None).

    On a local filesystem (or NFS) the checkpoint is read where it is: no copy. From remote
    storage one process per node downloads it and the node's other ranks read the same copy: at 7B
    under ZeRO-3 a checkpoint is ~100 GB, and a copy per rank filled the disk. Each rank records
    itself as the copy's owner as it takes it; the group fails and restarts as a whole, so the
    copy is stale once that owner is gone (:func:`sweep_stale_scratch`).
    """
    if isinstance(filesystem, pafs.LocalFileSystem):
        return path, None
    copy = Path(root or tempfile.gettempdir()) / (RESUME_COPY + hashlib.sha256(path.encode()).hexdigest()[:16])
    fetch_once(copy, lambda into: pafs.copy_files(path, into, source_filesystem=filesystem), claim=record_owner)
    return str(copy), copy
