"""Training progress on the driver's console: one line per logging step from rank 0.

Worker stdout is not forwarded (it would bury these lines under library chatter), so rank 0 puts
its lines on a Ray queue and the driver prints them while ``fit`` runs.
"""

from __future__ import annotations

import threading

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
