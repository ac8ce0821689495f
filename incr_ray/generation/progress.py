"""Training progress from rank 0: one line per logging step on the driver's console, and with
``tracking.backend: mlflow`` the same steps' loss and learning rate in the generation's MLflow run.

Worker stdout is not forwarded (it would bury these lines under library chatter), so rank 0 puts
its lines on a Ray queue and the driver prints them while ``fit`` runs.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import ray
from ray.util.queue import Empty, Queue
from transformers import TrainerCallback


class ProgressCallback(TrainerCallback):
    def __init__(self, generation: int, max_steps: int, queue: Queue):
        self.generation = generation
        self.max_steps = max_steps
        self.queue = queue

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            line = (f"[gen {self.generation}] step {state.global_step}/{self.max_steps}  "
                    f"loss {float(logs['loss']):.4f}  lr {float(logs.get('learning_rate', 0)):.2e}")
            try:
                self.queue.put_nowait(line)
            except Exception:  # noqa: BLE001 - progress must never fail training
                pass


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

    def __init__(self, say):
        self.queue = Queue(maxsize=1000, actor_options={"num_cpus": 0})
        self.say = say
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._relay, daemon=True)

    def _relay(self) -> None:
        while True:
            try:
                self.say(self.queue.get(timeout=0.5))
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
