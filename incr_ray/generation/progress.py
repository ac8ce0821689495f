"""Training progress from rank 0: one line per logging step on the driver's console, ``gen_NNN/progress.json``,
and with ``tracking.backend: mlflow`` the same steps' loss and learning rate in the generation's MLflow run.

Worker stdout is not forwarded (it would bury these lines under library chatter), so rank 0 puts
its lines on a Ray queue and the driver prints them while ``fit`` runs. Rank 0 also writes a
small ``progress.json`` into the generation's folder (at most every :data:`WRITE_EVERY_S`
seconds), which ``incr-ray status`` reads from anywhere that reaches the run's storage.

The figures (:func:`incr_ray.generation.rates.step_rates`) come from rank 0's last few logging steps: rows/s over all
workers, tokens/s (non-padding tokens, from the attention masks rank 0 collated, times the
number of workers) and the ETA of the generation and of the run (training time only: teacher
scoring and each generation's start-up come on top).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import ray
from ray.util.queue import Empty, Queue
from transformers import TrainerCallback

from ..storage import write_json_atomic
from .rates import PROGRESS_RATES, WINDOW, WRITE_EVERY_S, duration, step_line, step_rates, tenths_reached, utc_now


class TokenCount:
    """A collate function that also counts the non-padding tokens it hands to training (the sum of
    each batch's attention mask; batches prefetched ahead of the step are counted a little early)."""

    def __init__(self, collate):
        self.collate = collate
        self.total = 0

    def __call__(self, batch):
        out = self.collate(batch)
        mask = out.get("attention_mask") if isinstance(out, dict) else None
        if mask is not None:
            self.total += int(mask.sum())
        return out


class ProgressCallback(TrainerCallback):
    """Rank 0: the per-step line (to the driver's queue) and ``progress.json`` (to storage)."""

    def __init__(self, generation: int, max_steps: int, queue: Queue, *, rows_per_step: int = 1, workers: int = 1,
                 later_steps: int = 0, tokens: TokenCount | None = None, dest: str | None = None):
        self.generation = generation
        self.max_steps = max_steps
        self.queue = queue
        self.rows_per_step, self.workers, self.later_steps = rows_per_step, workers, later_steps
        self.tokens = tokens
        self.dest = dest  # gen_<g>/progress.json; None: not written
        self.samples: deque[tuple[float, int, int]] = deque(maxlen=WINDOW + 1)
        self.written = 0.0
        self.loss: float | None = None
        self.lr: float | None = None

    def _sample(self, step: int) -> None:
        self.samples.append((time.monotonic(), step, self.tokens.total if self.tokens else 0))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self._sample(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and logs and "loss" in logs):
            return
        try:
            self._sample(state.global_step)
            self.loss, self.lr = float(logs["loss"]), float(logs.get("learning_rate", 0))
            rates = self._rates()
            self.queue.put_nowait(step_line(self.generation, state.global_step, self.max_steps, self.loss, self.lr, rates))
            self._write(state.global_step, rates, force=False)
        except Exception:  # noqa: BLE001 - progress must never fail training
            pass

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.samples:
            try:
                if state.global_step > self.samples[-1][1]:
                    self._sample(state.global_step)
                self._write(state.global_step, self._rates(), force=True)
            except Exception:  # noqa: BLE001 - progress must never fail training
                pass

    def _rates(self) -> dict:
        return step_rates(list(self.samples), self.max_steps, self.rows_per_step, self.workers, self.later_steps)

    def _write(self, step: int, rates: dict, force: bool) -> None:
        now = time.monotonic()
        if self.dest is None or (not force and now - self.written < WRITE_EVERY_S):
            return
        record = {"generation": self.generation, "step": step, "max_steps": self.max_steps,
                  "loss": self.loss, "lr": self.lr, **{k: rates[k] for k in PROGRESS_RATES}, "updated_at": utc_now()}
        write_json_atomic(self.dest, record)
        self.written = now


def queue_say(queue: Queue) -> Callable[[str], None]:
    """A ``say`` for workers: the line goes to the driver's console through the progress queue."""

    def say(line: str) -> None:
        try:
            queue.put_nowait(line)
        except Exception:  # noqa: BLE001 - progress must never fail training
            pass

    return say


class MlflowStepLogger(TrainerCallback):
    """Rank 0 logs each logging step's ``loss`` and ``learning_rate`` (step = the optimizer step) into
    the generation's MLflow run, through an explicit client and run id.

    A failure is said once (through ``say``) and ends the logging for this generation; it never
    reaches the Trainer.
    """

    KEYS = ("loss", "learning_rate")

    def __init__(self, uri: str, run_id: str, generation: int, say: Callable[[str], None]):
        self.uri, self.run_id, self.generation, self.say = uri, run_id, generation, say
        self.client = None
        self.failed = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.failed or not state.is_world_process_zero or not logs:
            return
        figures = {k: float(logs[k]) for k in self.KEYS if isinstance(logs.get(k), (int, float))}
        if not figures:
            return
        try:
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            if self.client is None:
                self.client = MlflowClient(tracking_uri=self.uri)
            stamp = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, state.global_step)
                                                        for k, v in figures.items()])
        except Exception as err:  # noqa: BLE001 - tracking must never fail training
            self.failed = True
            first = (str(err).strip().splitlines() or [""])[0][:200]
            self.say(f"[gen {self.generation}] warning: MLflow stopped taking the per-step figures "
                     f"({type(err).__name__}: {first}); training goes on")


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
