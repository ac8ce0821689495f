"""Training progress on the driver's console: the Ray queue that carries rank 0's lines, and teacher
scoring's tenths.

Worker stdout is not forwarded (it would bury these lines under library chatter), so rank 0 puts
its lines on a Ray queue (:class:`ProgressRelay`) and the driver prints them while ``fit`` runs.
The rank-0 side — the per-step line, ``gen_NNN/progress.json``, the MLflow step figures — is Ray-free
and lives in :mod:`incr_ray.generation.callbacks`.
"""

from __future__ import annotations

import threading
import time

import ray
from ray.util.queue import Empty, Queue

# The rank-0 callbacks are Ray-free (the recipe runs without Ray); re-exported for their callers here.
from .callbacks import MlflowStepLogger, ProgressCallback, TokenCount, queue_say  # noqa: F401
from .rates import duration, tenths_reached


class ProgressRelay:
    """Driver side of the progress queue: prints what rank 0 sends while the block runs."""

    def __init__(self, say, maxsize: int = 1000):
        self.queue = Queue(maxsize=maxsize, actor_options={"num_cpus": 0})
        self.say = say
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._relay, daemon=True)

    def handle(self, item) -> None:
        self.say(item)

    def _relay(self) -> None:
        while True:
            try:
                self.handle(self.queue.get(timeout=0.5))
            except Empty:
                if self.done.is_set():
                    return
            except Exception:  # noqa: BLE001 - the queue actor went away with the cluster
                return

    def __enter__(self) -> "ProgressRelay":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        ray.kill(self.queue.actor)


class ScoringProgress(ProgressRelay):
    """Teacher scoring's progress on a console that is not a terminal: the scoring actors put
    their batches' row counts on the queue (unbounded, so an actor never waits), and a line is
    printed at every tenth of the rows. (On a terminal Ray Data's progress bars show it instead.)"""

    def __init__(self, say, total: int, label: str):
        super().__init__(say, maxsize=0)
        self.total, self.label, self.done_rows = total, label, 0
        self.started = time.monotonic()

    @property
    def actor(self):
        return self.queue.actor

    def handle(self, rows) -> None:
        before, self.done_rows = self.done_rows, self.done_rows + int(rows)
        marks = tenths_reached(before, self.done_rows, self.total)
        if marks:
            seconds = time.monotonic() - self.started
            rate = self.done_rows / seconds if seconds > 0 else 0.0
            left = (self.total - self.done_rows) / rate if rate > 0 else None
            self.say(f"{self.label} {10 * marks[-1]}% ({self.done_rows} of {self.total} rows, "
                     f"{rate:.1f} rows/s, ETA {duration(left)})")

    def __exit__(self, *exc) -> None:
        # The actors' last counts may still be on their way when the write returns: wait for them
        # a moment, so that a finished scoring says 100%.
        deadline = time.monotonic() + 2.0
        while exc[0] is None and self.done_rows < self.total and time.monotonic() < deadline:
            time.sleep(0.05)
        super().__exit__(*exc)
