"""Test-only fault injection: the one seam through which tests make a run fail on purpose.

Nothing here is a user setting. A test puts a JSON object in the ``INCR_RAY_FAULTS`` environment
variable before Ray starts; :func:`incr_ray.cli.init_ray` forwards it to every Ray worker through
the job's runtime env. Keys (all optional)::

    {"stop_after_generation": 0,   # the driver raises StopRequested after that generation
     "worker_exit_at_step": 3,     # training rank 1 dies at that optimizer step
     "teacher_exit_at_batch": 3,   # a teacher actor dies before scoring that batch (1-based)
     "worker_raise_at_step": 1,    # training rank 0 prints a line to stderr and raises
     "once_dir": "/tmp/x"}         # where the killing faults remember that they fired

A fault that kills a process fires once per ``once_dir`` (a marker file), so the retried work
succeeds, as it would after a real crash.
"""

from __future__ import annotations

import json
import os
import sys
import time

ENV = "INCR_RAY_FAULTS"


class StopRequested(RuntimeError):
    """The run stopped where a test asked it to (``stop_after_generation``)."""


def _faults() -> dict:
    return json.loads(os.environ.get(ENV) or "{}")


def runtime_env_vars() -> dict[str, str]:
    """What Ray workers need to see the faults of this process."""
    value = os.environ.get(ENV)
    return {ENV: value} if value else {}


def _first_time(name: str) -> bool:
    """True once per ``once_dir``: the marker file is created atomically."""
    once_dir = _faults().get("once_dir")
    if not once_dir:
        return True
    try:
        os.close(os.open(os.path.join(once_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def fired(name: str) -> bool:
    """Whether the killing fault ``name`` ("worker" or "teacher") has fired (tests assert it did)."""
    once_dir = _faults().get("once_dir")
    return bool(once_dir) and os.path.exists(os.path.join(once_dir, name))


def stop_after_generation(g: int, k: int) -> None:
    if _faults().get("stop_after_generation") == g and g < k - 1:
        raise StopRequested(f"stopped after generation {g} ({ENV})")


def kill_teacher_before_batch(batch_number: int) -> None:
    if _faults().get("teacher_exit_at_batch") == batch_number and _first_time("teacher"):
        os._exit(1)


def kill_worker_at_step(step: int, rank: int) -> None:
    if _faults().get("worker_exit_at_step") == step and rank == 1 and _first_time("worker"):
        # Ray Train's controller registers a reported checkpoint on its next poll; a crash within
        # milliseconds of a save would race that. Real crashes come later.
        time.sleep(3)
        os._exit(1)


def raise_in_worker_at_step(step: int, rank: int) -> None:
    if _faults().get("worker_raise_at_step") == step and rank == 0:
        print(f"fault injected: rank {rank} fails at step {step}", file=sys.stderr, flush=True)
        raise RuntimeError(f"injected failure at step {step} ({ENV})")
