"""The GPU check's results (``benchmarks/gpu_check.py``): one JSON and one markdown table,
``gpu_check.json`` and ``gpu_check.md``, rewritten after every step, so a run cut short still leaves
what it measured. Each section runs through :meth:`Report.run`, which keeps its error and goes on.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable


class Report:
    """The check's sections and their results; past ``guard_s`` seconds the next sections are skipped."""

    def __init__(self, out: Path, mode: str, argv: list[str], guard_s: float, **meta: Any):
        self.out, self.guard_s = out, guard_s
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "meta": {"mode": mode, "argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                     "guard_s": guard_s, **meta},
            "sections": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.guard_s

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "pending"})

    def run(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """Run one section; its dict is filled in place, so what it measured before an error stays."""
        out = self.section(name)
        if self.over_budget():
            out.update(status=f"skipped: over the {self.guard_s:.0f} s guard at {self.elapsed():.0f} s")
            self.write()
            return
        print(f"\n=== {name} (at {self.elapsed():.0f} s) ===", flush=True)
        out["status"] = "running"
        self.write()
        start = time.monotonic()
        try:
            fn(out)
            if out["status"] == "running":
                out["status"] = "ok"
        except BaseException as err:  # noqa: BLE001 - one section's failure must not end the check
            out["status"] = "error"
            out["error"] = f"{type(err).__name__}: {err}"[:2000]
            out["traceback"] = traceback.format_exc()[-6000:]
            print(out["traceback"], file=sys.stderr, flush=True)
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            out["seconds"] = round(time.monotonic() - start, 2)
            self.write()

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", render_markdown(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, self.out / name)  # a kill mid-write leaves the previous complete file


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


# (section, key path, label) rows of the markdown table; everything else stays in the JSON.
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("environment", "gpu", "GPU"),
    ("environment", "gpu_memory_gib", "GPU memory (GiB)"),
    ("environment", "versions", "versions"),
    ("environment", "deepspeed", "DeepSpeed"),
    ("environment", "deepspeed_ops_compatible", "DeepSpeed ops compatible (not built)"),
    ("environment", "matmul.tflops", "matmul TFLOP/s (measured)"),
    ("environment", "matmul.shape", "matmul shape, dtype"),
    ("minilm", "precision", "precision"),
    ("minilm", "gen0.deepspeed", "trained under DeepSpeed"),
    ("minilm", "zero_stage", "ZeRO stage"),
    ("minilm", "gen0.dist_backend", "process group backend"),
    ("minilm", "gen0.holdout.accuracy", "gen 0 holdout accuracy"),
    ("minilm", "gen0.holdout.nll", "gen 0 holdout NLL"),
    ("minilm", "gen0.holdout.ece", "gen 0 holdout ECE"),
    ("minilm", "gen1.holdout.accuracy", "gen 1 holdout accuracy"),
    ("minilm", "gen1.holdout.nll", "gen 1 holdout NLL"),
    ("minilm", "gen1.holdout.ece", "gen 1 holdout ECE"),
    ("minilm", "gen1.saved_model_holdout.accuracy", "gen 1 saved model, HoldoutStatsScorer accuracy"),
    ("minilm", "targets_fp32", "targets arrive in fp32"),
    ("minilm", "targets_dtype", "targets dtype in compute_loss"),
    ("minilm", "max_row_sum_error", "max abs(row sum - 1) of targets"),
    ("minilm", "rows_sum_to_1", "rows sum to 1 (1e-6)"),
    ("minilm", "target_0_9.value", "value at a 0.9 target"),
    ("minilm", "logits_dtype", "logits dtype"),
    ("minilm", "teacher.rows_per_s", "teacher rows/s"),
    ("minilm", "teacher.raised_fraction", "teacher rows raised to the threshold"),
    ("minilm", "gen0.samples_per_second", "gen 0 student samples/s (worker formula)"),
    ("minilm", "gen1.samples_per_second", "gen 1 student samples/s (worker formula)"),
    ("minilm", "gen1.steady.samples_per_s", "gen 1 student samples/s (steady state)"),
    ("decoder", "model", "model"),
    ("decoder", "params", "parameters N"),
    ("decoder", "stage_reason", "ZeRO stage chosen because"),
    ("decoder", "teacher.rows_per_s", "teacher rows/s"),
    ("ray_train", "reason", "reason"),
)
RUN_ROWS: tuple[tuple[str, str], ...] = (
    ("zero_stage", "ZeRO stage"),
    ("precision.requested", "precision"),
    ("steady.tokens_per_s", "tokens/s (non-pad)"),
    ("mfu", "MFU = 6·N·tokens/s / peak"),
    ("step_s", "s/step"),
    ("peak_allocated_gib", "peak allocated (GiB)"),
    ("peak_reserved_gib", "peak reserved (GiB)"),
    ("plan.total_gib", "planned total (GiB, ×1.10)"),
    ("plan.states_gib", "planned states (GiB)"),
    ("plan.activations_gib", "planned activations (GiB)"),
    ("measured_over_planned", "peak allocated / planned total"),
    ("measured_over_planned_no_overhead", "peak allocated / planned (states + activations)"),
    ("achieved_tflops", "achieved TFLOP/s (6·N·tokens/s)"),
    ("tokens_per_row", "non-pad tokens per row"),
)


def render_markdown(data: dict[str, Any]) -> str:
    meta, sections = data["meta"], data["sections"]
    out = [f"# incr-ray GPU check ({meta['mode']})", "",
           f"Started {meta['started']}; {meta.get('elapsed_s', 0):.0f} s elapsed. "
           f"MFU denominator: {meta['peak_name']}.", "",
           "| section | check | value |", "| --- | --- | --- |"]
    for name, sec in sections.items():
        line = sec.get("status", "?") + (f" ({sec['seconds']:.1f} s)" if "seconds" in sec else "")
        out.append(f"| {name} | status | {_fmt(line)} |")
        if sec.get("error"):
            out.append(f"| {name} | error | {_fmt(sec['error'][:300])} |")
        for s, path, label in TABLE_ROWS:
            if s == name and _get(sec, path) is not None:
                out.append(f"| {name} | {label} | {_fmt(_get(sec, path))} |")
        for run in sec.get("runs", []) or []:
            tag = run.get("name", "?")
            if run.get("status") not in (None, "ok"):
                out.append(f"| {name} | {tag}: status | {_fmt(run.get('status'))} {_fmt(run.get('error', ''))[:300]} |")
            for path, label in RUN_ROWS:
                if _get(run, path) is not None:
                    out.append(f"| {name} | {tag}: {label} | {_fmt(_get(run, path))} |")
    return "\n".join(out) + "\n"
