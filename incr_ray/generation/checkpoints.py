"""When a generation saves an in-generation checkpoint, free of Ray: every N optimizer steps
(``student.checkpoint_every_steps``) or after every N minutes of training
(``student.checkpoint_every_minutes``), never at the last step (the final model is saved then).

Every rank must save together: a save that some ranks start and others do not hangs ZeRO's
collectives. A step cadence is the same on every rank by construction; a time budget is judged on
rank 0's clock and broadcast (one one-element broadcast per optimizer step, only while a time budget
is in force on several ranks). Handing the saved folder to Ray Train is the Ray glue's part
(:class:`incr_ray.generation.student._ReportCheckpoint`).
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.distributed as dist
from transformers import TrainerCallback

# What a Hugging Face checkpoint folder holds when the Trainer saved the model's weights into it.
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
               "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin")


def checkpoint_due(step: int, max_steps: int, every_steps: int, every_s: float, since_last_s: float) -> bool:
    """Whether to save after optimizer step ``step`` of ``max_steps``: every ``every_steps`` steps
    when that is set, else once ``since_last_s`` seconds of training since the last save (or the
    start) reach ``every_s`` (0: never). Never at the last step."""
    if step >= max_steps:
        return False
    if every_steps:
        return step % every_steps == 0
    return 0 < every_s <= since_last_s


def checkpointing(every_steps: int, every_minutes: float) -> bool:
    """Whether a generation takes in-generation checkpoints at all."""
    return bool(every_steps) or every_minutes > 0


def rank0_decides(flag: bool, device) -> bool:
    """Rank 0's ``flag`` on every rank of the process group (the flag itself without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # NCCL broadcasts device tensors only; gloo takes CPU ones.
    on = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    value = torch.tensor([int(flag)], dtype=torch.int32, device=on)
    dist.broadcast(value, src=0)
    return bool(value.item())


class CheckpointCadence(TrainerCallback):
    """Sets ``control.should_save`` when :func:`checkpoint_due` says so, the same on every rank.

    The time budget counts training since the last save ended (or ``train()`` began, a resume
    too), so a slow save never makes the next one come sooner. ``decide(flag, device)`` makes the
    ranks agree (:func:`rank0_decides`); the tests give their own clock and decision."""

    def __init__(self, every_steps: int, every_minutes: float, clock: Callable[[], float] = time.monotonic,
                 decide: Callable[[bool, object], bool] = rank0_decides):
        self.every_steps, self.every_s = every_steps, every_minutes * 60.0
        self.clock, self.decide = clock, decide
        self.last = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        due = checkpoint_due(state.global_step, state.max_steps, self.every_steps, self.every_s,
                             self.clock() - self.last)
        if not self.every_steps and self.every_s > 0 and state.global_step < state.max_steps:
            due = self.decide(due, args.device)  # a time budget: rank 0's clock for every rank
        if due:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = self.clock()


def folder_figures(folder: str) -> tuple[int, bool]:
    """(bytes under ``folder``, whether it holds a model weights file at its top level)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                continue
    return total, any(os.path.exists(os.path.join(folder, name)) for name in MODEL_FILES)
