"""The student's Trainer callbacks for side concerns, free of Ray: rank 0's progress lines and
``progress.json``, the per-step figures into MLflow, and the collate that counts tokens.

Rank 0 puts one line per logging step on a queue (anything with ``put_nowait``; None: no lines):
on Ray Train the driver's :class:`incr_ray.generation.progress.ProgressRelay` prints them while
``fit`` runs. Rank 0 also writes a small ``progress.json`` into the generation's folder (at most
every :data:`~incr_ray.generation.rates.WRITE_EVERY_S` seconds), which ``incr-ray status`` reads
from anywhere that reaches the run's storage.

The figures (:func:`incr_ray.generation.rates.step_rates`) come from rank 0's last few logging
steps: rows/s over all workers, tokens/s (non-padding tokens, from the attention masks rank 0
collated, times the number of workers) and the ETA of the generation and of the run (training time
only: teacher scoring and each generation's start-up come on top).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable

from transformers import TrainerCallback

from ..storage import write_json_atomic
from .rates import PROGRESS_RATES, WINDOW, WRITE_EVERY_S, steady_rate, step_line, step_rates, utc_now


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

    def __init__(self, generation: int, max_steps: int, queue, *, rows_per_step: int = 1, workers: int = 1,
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
            if self.queue is not None:
                line = step_line(self.generation, state.global_step, self.max_steps, self.loss, self.lr, rates)
                self.queue.put_nowait(line)
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


def queue_say(queue) -> Callable[[str], None]:
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


class StepClock(TrainerCallback):
    """When ``train()`` began and each of its optimizer steps ended (this rank's monotonic clock),
    for the steady-state rate (:func:`incr_ray.generation.rates.steady_rate`)."""

    def __init__(self):
        self.started: float | None = None
        self.ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.ends = time.monotonic(), []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.monotonic())

    def rates(self, rows_per_step: int) -> dict[str, float | None]:
        return steady_rate(self.ends, self.started or 0.0, rows_per_step)
