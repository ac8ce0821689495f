"""The GPU check's results (``benchmarks/gpu_check.py``): one JSON and one markdown table,
``gpu_check.json`` and ``gpu_check.md``, rewritten after every section, so a run cut short still
leaves what it measured.

Each section runs in its own process with its own time limit (:func:`run_sections`): the section
rewrites ``sections/<name>.json`` after each step it measures (:class:`SectionFile`), the launcher
kills its process group when the limit passes, reads back what the file holds, and rewrites the
results. A hung NCCL call, a Ray that never starts or an OOM in one section costs that section only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON at ``path``, atomically: a kill mid-write leaves the previous complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Section:
    """One section of the check: its time limit on the GPU and in the CPU smoke, and whether it needs Ray."""

    name: str
    gpu_s: float
    cpu_s: float
    ray: bool = False
    what: str = ""


class Report:
    """The launcher's view: every section's results, ``gpu_check.json`` and ``.md`` in ``out``."""

    def __init__(self, out: Path, mode: str, argv: list[str], budget_s: float, **meta: Any):
        self.out, self.budget_s = Path(out), budget_s
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "meta": {"mode": mode, "argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                     "budget_s": budget_s, **meta},
            "sections": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "pending"})

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        write_json(self.out / "gpu_check.json", self.data)
        tmp = self.out / "gpu_check.md.tmp"
        tmp.write_text(render_markdown(self.data))
        os.replace(tmp, self.out / "gpu_check.md")


class SectionFile(dict):
    """In a section's process: its results, rewritten to ``<out>/sections/<name>.json`` by :meth:`write`."""

    def __init__(self, out: Path, name: str, limit_s: float):
        super().__init__(status="running")
        self.path = Path(out) / "sections" / f"{name}.json"
        self.deadline = time.monotonic() + limit_s

    def left(self) -> float:
        """Seconds until the launcher kills this section."""
        return self.deadline - time.monotonic()

    def write(self) -> None:
        write_json(self.path, dict(self))

    def run(self, fn: Callable[["SectionFile"], None]) -> int:
        """``fn(self)``, then the status: ok, or error with its traceback (what it measured stays)."""
        self.write()
        try:
            fn(self)
            if self["status"] == "running":
                self["status"] = "ok"
            return 0
        except BaseException as err:  # noqa: BLE001 - recorded; the launcher goes on to the next section
            self.update(status="error", error=f"{type(err).__name__}: {err}"[:2000],
                        traceback=traceback.format_exc()[-6000:])
            print(self["traceback"], file=sys.stderr, flush=True)
            return 1
        finally:
            self.write()


def read_section(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM to the section's process group (its Ray, its ``incr-ray train``), SIGKILL after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_section(report: Report, name: str, cmd: Sequence[str], limit_s: float, env: dict[str, str] | None = None) -> None:
    """Run one section's process, at most ``limit_s`` seconds; merge what it wrote into the report."""
    out = report.section(name)
    out.update(status="running", limit_s=round(limit_s, 1), started_at_s=round(report.elapsed(), 1))
    report.write()
    section_file = report.out / "sections" / f"{name}.json"
    section_file.unlink(missing_ok=True)
    log = report.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {name} (at {report.elapsed():.0f} s, limit {limit_s:.0f} s; log {log}) ===", flush=True)
    start = time.monotonic()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(list(cmd), stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None
        except BaseException:  # Ctrl-C in the launcher: the section's processes go too
            _kill_group(proc, grace_s=1.0)
            raise
        _kill_group(proc, grace_s=1.0)  # what outlived a finished section (a Ray it left, a stray worker)
    out.update(read_section(section_file))
    if rc is None:
        out["status"] = f"timeout: killed at its {limit_s:.0f} s limit (what it wrote before is kept)"
    elif rc != 0 and out.get("status") in ("running", "pending"):
        out.update(status="error", error=f"exit code {rc}")
    if out["status"] not in ("ok",) and not str(out["status"]).startswith("skipped"):
        out["log_tail"] = _log_tail(log)
    out["seconds"] = round(time.monotonic() - start, 2)
    report.write()


def run_sections(report: Report, plan: Sequence[tuple[str, Sequence[str], float]], env: dict[str, str] | None = None,
                 min_s: float = 5.0) -> None:
    """Each ``(name, command, limit_s)`` in turn, within the report's budget: a section gets its own
    limit or what is left of the budget, whichever is less; with under ``min_s`` left it is skipped."""
    for name, _, _ in plan:
        report.section(name)
    report.write()
    for name, cmd, limit_s in plan:
        left = report.budget_s - report.elapsed()
        if left < min_s:
            report.section(name)["status"] = f"skipped: {left:.0f} s left of the {report.budget_s:.0f} s budget"
            report.write()
            continue
        run_section(report, name, cmd, min(limit_s, left), env)


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
    ("decoder", "teacher.mfu.mfu_measured", "teacher MFU (2·N) / measured peak"),
    ("decoder", "teacher.mfu.mfu_vendor", "teacher MFU (2·N) / vendor peak"),
    ("ray_train", "reason", "reason"),
)
RUN_ROWS: tuple[tuple[str, str], ...] = (
    ("zero_stage", "ZeRO stage"),
    ("precision.requested", "precision"),
    ("steady.tokens_per_s", "tokens/s (non-pad)"),
    ("mfu.mfu_measured", "MFU = 6·N·tokens/s / measured peak"),
    ("mfu.mfu_vendor", "MFU = 6·N·tokens/s / vendor peak"),
    ("mfu.goal_met", "≥ 40% of the vendor peak"),
    ("step_s", "s/step"),
    ("peak_allocated_gib", "peak allocated (GiB)"),
    ("peak_reserved_gib", "peak reserved (GiB)"),
    ("plan.total_gib", "planned total (GiB, ×1.10)"),
    ("plan.states_gib", "planned states (GiB)"),
    ("plan.activations_gib", "planned activations (GiB)"),
    ("measured_over_planned", "peak allocated / planned total"),
    ("measured_over_planned_no_overhead", "peak allocated / planned (states + activations)"),
    ("mfu.achieved_tflops", "achieved TFLOP/s (6·N·tokens/s)"),
    ("tokens_per_row", "non-pad tokens per row"),
)


def render_markdown(data: dict[str, Any]) -> str:
    meta, sections = data["meta"], data["sections"]
    out = [f"# incr-ray GPU check ({meta['mode']})", "",
           f"Started {meta['started']}; {meta.get('elapsed_s', 0):.0f} s elapsed of a {meta.get('budget_s', 0):.0f} s "
           "budget. MFU: FLOPs per non-pad token (6·N training, 2·N forward) × tokens/s, over the measured "
           "bf16 matmul peak and over the vendor's dense bf16 figure for the GPU.", "",
           "| section | check | value |", "| --- | --- | --- |"]
    for name, sec in sections.items():
        line = sec.get("status", "?") + (f" ({sec['seconds']:.1f} s)" if "seconds" in sec else "")
        out.append(f"| {name} | status | {_fmt(line)} |")
        if sec.get("error"):
            out.append(f"| {name} | error | {_fmt(sec['error'][:300])} |")
        for label, value in (sec.get("summary") or {}).items():
            out.append(f"| {name} | {label} | {_fmt(value)} |")
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
