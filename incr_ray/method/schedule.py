"""Schedules over a student's steps: the run-long learning rate and teacher annealing. Plain Python.

``student.schedule: run`` replaces the per-generation warmup + decay (which restarts at the peak on
every block) with one piecewise-linear curve over the optimizer steps of all k planned generations:
warmup, then a linear decay to ``RUN_SCHEDULE_FLOOR`` of the peak at the end of generation k−1.
Generations trained later (``extend``) stay at that floor.
"""

from __future__ import annotations

RUN_SCHEDULE_FLOOR = 0.1  # share of the peak learning rate at the end of the planned generations


def run_lr_factor(step: int, warmup: int, total: int, floor: float = RUN_SCHEDULE_FLOOR) -> float:
    """Multiplier of the peak learning rate at run-wide optimizer step ``step`` (0-based).

    Rises linearly over ``warmup`` steps (from ``1/warmup`` at step 0, so the first step learns),
    then falls linearly from 1 at ``warmup`` to ``floor`` at ``total``, and stays at ``floor``.
    """
    if total < 1 or not 0 <= warmup < total:
        raise ValueError(f"run_lr_factor: need 0 <= warmup < total, got warmup={warmup}, total={total}")
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return floor
    return 1.0 - (1.0 - floor) * (step - warmup) / (total - warmup)


def annealed_alpha(alpha: float, step: int, max_steps: int) -> float:
    """Weight of the hard-label loss at ``step`` of ``max_steps`` under teacher annealing.

    The soft target t moves linearly toward the one-hot label y over the student's training:
    CE against (1−λ)·t + λ·y equals (1−λ)·CE(t) + λ·CE(y), so annealing is the hard-label mix α
    rising from its configured value to 1 with λ = step / max_steps.
    """
    lam = min(1.0, max(0.0, step / max(1, max_steps)))
    return alpha + (1.0 - alpha) * lam


def linear_lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at step ``step`` of a generation's own schedule
    (``student.schedule: generation``): the Hugging Face Trainer's ``linear``, from 0 up over
    ``warmup`` steps, then down to 0 at ``total``."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def balanced_tail_factor(step: int, main_steps: int, main_factor: float, tail_factor: float) -> float:
    """Balanced fine-tuning's place on a student's schedule: the main training's multiplier
    (``main_factor``, what its own schedule gives at ``step``) for its ``main_steps`` steps, then
    ``tail_factor`` (``student.balanced_lr_factor``), constant, for the balanced pass after them."""
    return main_factor if step < main_steps else tail_factor
