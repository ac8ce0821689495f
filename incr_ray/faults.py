"""Test-only fault injection: the one seam through which tests make a run fail on purpose.

Nothing here is a user setting. A test chooses faults in the driver process
(``with faults.injected(worker_exit_at=[0, 3], once_dir=...)``, which sets the ``INCR_RAY_FAULTS``
environment variable of this process only); the driver hands :func:`current` to its workers with
each call — ``fit_student`` in the training loop's config, ``score_block`` in the scoring actors'
constructor arguments — and they :func:`install` it. So the faults travel with the call, not with
``ray.init``: one Ray serves tests with and without faults. Keys (all optional)::

    {"stop_after_generation": 0,   # the driver raises StopRequested after that generation
     "worker_exit_at": [0, 3],     # training rank 1 dies in generation 0 at optimizer step 3
     "worker_raise_at": [1, 1],    # training rank 0 prints a line to stderr and raises (every try)
     "teacher_exit_at_batch": 3,   # a teacher actor dies before scoring that batch (1-based)
     "once_dir": "/tmp/x",         # where the killing faults remember that they fired
     "trained_rows_dir": "/tmp/y"} # not a fault: each training rank writes the rows each step trained

A fault that kills a process fires once per ``once_dir`` (a marker file), so the retried work
succeeds, as it would after a real crash.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

ENV = "INCR_RAY_FAULTS"
_installed: dict[str, Any] | None = None  # set in a worker or actor by install()


class StopRequested(RuntimeError):
    """The run stopped where a test asked it to (``stop_after_generation``)."""


def current() -> dict[str, Any]:
    """The faults of this process: those installed (a worker, an actor) or the driver's."""
    if _installed is not None:
        return _installed
    return json.loads(os.environ.get(ENV) or "{}")


def install(chosen: dict[str, Any] | None) -> None:
    """In a worker or actor: the faults its driver passed with the call (``current()`` there).
    None (a scorer built in-process, outside Ray) leaves this process's own faults as they are."""
    global _installed
    if chosen is not None:
        _installed = dict(chosen)


@contextmanager
def injected(**chosen: Any) -> Iterator[None]:
    """Driver side, for tests: the calls made inside the block carry these faults."""
    before = os.environ.get(ENV)
    os.environ[ENV] = json.dumps(chosen)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = before


def _first_time(name: str) -> bool:
    """True once per ``once_dir``: the marker file is created atomically."""
    once_dir = current().get("once_dir")
    if not once_dir:
        return True
    try:
        os.close(os.open(os.path.join(once_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def fired(name: str, once_dir: str) -> bool:
    """Whether the killing fault ``name`` ("worker" or "teacher") fired for ``once_dir``."""
    return os.path.exists(os.path.join(once_dir, name))


def stop_after_generation(g: int, k: int) -> None:
    if current().get("stop_after_generation") == g and g < k - 1:
        raise StopRequested(f"stopped after generation {g} ({ENV})")


def kill_teacher_before_batch(batch_number: int) -> None:
    if current().get("teacher_exit_at_batch") == batch_number and _first_time("teacher"):
        os._exit(1)


def kill_worker_at_step(generation: int, step: int, rank: int) -> None:
    if current().get("worker_exit_at") == [generation, step] and rank == 1 and _first_time("worker"):
        # Ray Train's controller registers a reported checkpoint on its next poll; a crash within
        # milliseconds of a save would race that. Real crashes come later.
        time.sleep(3)
        os._exit(1)


def raise_in_worker_at_step(generation: int, step: int, rank: int) -> None:
    if current().get("worker_raise_at") == [generation, step] and rank == 0:
        print(f"fault injected: rank {rank} fails at step {step}", file=sys.stderr, flush=True)
        raise RuntimeError(f"injected failure at step {step} ({ENV})")


class TrainedRows:
    """The rows each optimizer step of one training rank trained (``trained_rows_dir``): one JSON
    line per step, ``{"step": 3, "rows": [row ids]}``, in ``<dir>/g<generation>-r<rank>-<pid>.jsonl``
    (a restarted worker is another process, so each try has its own file).

    The collate adds the batch's row ids under :attr:`KEY`; :meth:`batches` takes them off before
    the Trainer sees the batch and keeps the last ``per_step`` (gradient accumulation) batches'; at
    each step's end (:meth:`step_end`) those are the ones that step trained: the Trainer pulls its
    batches one at a time, and a resume's fast-forward pulls the skipped ones before the first."""

    KEY = "_incr_ray_row_id"

    def __init__(self, folder: str, generation: int, rank: int, per_step: int):
        self.path = os.path.join(folder, f"g{generation}-r{rank}-{os.getpid()}.jsonl")
        self.recent: deque[list[int]] = deque(maxlen=per_step)

    def collate(self, collate: Callable[[dict], dict]) -> Callable[[dict], dict]:
        import torch

        def with_row_ids(batch: dict) -> dict:
            out = collate(batch)
            out[self.KEY] = torch.as_tensor(batch["row_id"])
            return out

        return with_row_ids

    def batches(self, stream: Iterable[dict]) -> Iterable[dict]:
        seam = self

        class Noted:
            def __iter__(self) -> Iterator[dict]:
                for batch in stream:
                    seam.recent.append(batch.pop(seam.KEY).tolist())
                    yield batch

        return Noted()

    def step_end(self, step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "rows": [i for rows in self.recent for i in rows]}) + "\n")


def trained_rows(generation: int, rank: int, per_step: int) -> TrainedRows | None:
    """The :class:`TrainedRows` seam of this training rank, or None (every real run)."""
    folder = current().get("trained_rows_dir")
    return TrainedRows(folder, generation, rank, per_step) if folder else None
