"""The arithmetic of progress reports, pure so that ``incr-ray status`` and the tests need
neither Ray nor transformers: throughput and ETAs from recent steps, durations, the step line."""

from __future__ import annotations

from datetime import datetime, timezone

PROGRESS_FILE = "progress.json"
WINDOW = 10  # logging steps behind the rates: recent enough to follow a slowdown, long enough to be steady
WRITE_EVERY_S = 10.0  # progress.json at most this often (one small PUT on object storage)
PROGRESS_RATES = ("rows_per_s", "tokens_per_s", "eta_generation_s", "eta_run_s")


def step_rates(samples: list[tuple[float, int, int]], max_steps: int, rows_per_step: int, workers: int,
               later_steps: int = 0) -> dict[str, float | None]:
    """Throughput and ETAs from rank 0's recent ``(seconds, step, tokens)`` samples, oldest first.

    ``rows_per_step`` is rows per optimizer step over all workers (batch × grad_accum × workers);
    ``tokens`` is rank 0's running count of non-padding tokens, scaled by ``workers`` (the shards
    are alike); ``later_steps`` are the planned steps of the generations still to train after this
    one. Returns ``seconds_per_step``, ``rows_per_s``, ``tokens_per_s``, ``eta_generation_s``
    (remaining steps × recent seconds per step) and ``eta_run_s`` (that plus ``later_steps`` at the
    same pace); each None until two samples at different steps exist.
    """
    none = dict.fromkeys(("seconds_per_step", "rows_per_s", "tokens_per_s", "eta_generation_s", "eta_run_s"))
    if len(samples) < 2:
        return none
    (t0, s0, k0), (t1, s1, k1) = samples[0], samples[-1]
    if s1 <= s0 or t1 <= t0:
        return none
    per_step = (t1 - t0) / (s1 - s0)
    left = max(max_steps - s1, 0)
    return {
        "seconds_per_step": per_step,
        "rows_per_s": rows_per_step / per_step,
        "tokens_per_s": (k1 - k0) * workers / (t1 - t0),
        "eta_generation_s": left * per_step,
        "eta_run_s": (left + later_steps) * per_step,
    }


def duration(seconds: float | None) -> str:
    """``3h05m``, ``4m10s``, ``12s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def step_line(generation: int, step: int, max_steps: int, loss: float, lr: float, rates: dict) -> str:
    """The console line of one logging step."""
    line = f"[gen {generation}] step {step}/{max_steps}  loss {loss:.4f}  lr {lr:.2e}"
    if rates.get("rows_per_s") is not None:
        line += (f"  {rates['rows_per_s']:.1f} rows/s  {rates['tokens_per_s']:.0f} tokens/s"
                 f"  ETA gen {duration(rates['eta_generation_s'])}, run {duration(rates['eta_run_s'])}")
    return line


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tenths_reached(before: int, after: int, total: int) -> list[int]:
    """The 10 %, 20 %, ... marks (as 1 … 10) that a count passing from ``before`` to ``after`` of
    ``total`` rows reached."""
    if total <= 0:
        return []
    return [t for t in range(1, 11) if before * 10 < t * total <= after * 10]


WARMUP_SHARE = 0.1  # of a generation's steps, at least one: the steps a steady rate leaves out


def steady_rate(step_ends: list[float], started: float, rows_per_step: int,
                warmup_share: float = WARMUP_SHARE) -> dict[str, float | None]:
    """The training rate once warm, beside the whole one: ``step_ends`` are the times (one
    clock) at which each optimizer step of this run of ``train()`` ended, ``started`` when it
    began. The first ``max(1, warmup_share × steps)`` steps — the first step's allocations and
    kernel choices, a resume's checkpoint load — are left out of ``steady_samples_per_second``;
    ``warmup_seconds`` is the time to the end of the last of them. None with fewer than 3 steps.
    """
    n = len(step_ends)
    if n < 3:
        return {"steady_samples_per_second": None, "warmup_seconds": None}
    skip = min(max(1, int(warmup_share * n)), n - 2)
    span = step_ends[-1] - step_ends[skip - 1]
    rate = (n - skip) * rows_per_step / span if span > 0 else None
    return {"steady_samples_per_second": rate, "warmup_seconds": step_ends[skip - 1] - started}
