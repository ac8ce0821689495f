"""``incr-ray status``: where a run stands, from its folder alone (``run.json`` and the newest
``gen_NNN/progress.json``), so it works without Ray from anywhere that reaches the run's storage.

:func:`render_status` is pure (dicts and a time in, text out); :func:`read_status` reads the files.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from ..generation.rates import PROGRESS_FILE, duration
from ..storage import absolute, exists, read_json
from .manifest import RunError, load

# A running run whose progress.json is older than this has probably stopped (a step of a real
# generation takes seconds; the file is rewritten every ~10 s while training runs).
STALE_AFTER_S = 600


def _metrics(m: dict[str, Any] | None) -> str:
    if not m:
        return "no holdout metrics"
    parts = [f"{name} {m[key]:.4f}" for key, name in
             (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("nll", "NLL"), ("ece", "ECE")) if key in m]
    return "holdout " + ", ".join(parts)


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _ago(then: datetime, now: datetime) -> str:
    return f"{duration(max((now - then).total_seconds(), 0))} ago"


def render_status(manifest: dict[str, Any], progress: dict[str, Any] | None, now: datetime) -> str:
    """A few lines on a run: its status, the generation and step it is at, the last figures and
    ETAs, the last finished generation's holdout metrics, and for a finished run the final model.

    ``manifest`` is run.json as a dict, ``progress`` the newest progress.json (or None), ``now``
    an aware UTC time. A running run whose last sign of life (progress.json, or the generation's
    start) is older than :data:`STALE_AFTER_S` is said to have possibly stopped.
    """
    gens = manifest.get("generations") or []
    k = (manifest.get("config") or {}).get("method", {}).get("k") or len(gens) or None
    status = manifest.get("status", "unknown")
    lines = [f"run {manifest.get('name')!r} ({manifest.get('run_dir')}): {status}"]
    finished = [e for e in gens if e.get("status") == "finished"]

    if status == "finished":
        final = next((e for e in gens if e.get("index") == manifest.get("final_generation")), None)
        lines.append(f"{len(finished)} generation(s) finished; final model {manifest.get('final_model')} "
                     f"(generation {manifest.get('final_generation')}): {_metrics((final or {}).get('metrics'))}")
        return "\n".join(lines)

    if manifest.get("error"):
        lines.append(f"error: {manifest['error']}")
    current = next((e for e in gens if e.get("status") != "finished"), None)
    total = f" of {k}" if k else ""
    if current is None:
        lines.append(f"{len(finished)} generation(s){total} finished; the run has not recorded its end")
    else:
        where = f"generation {current['index']}{total}"
        p = progress if progress and progress.get("generation") == current["index"] else None
        if p:
            loss = p.get("loss")
            rate = p.get("rows_per_s")
            lines.append(
                f"{where}: step {p.get('step')}/{p.get('max_steps')}"
                + (f", loss {loss:.4f}" if loss is not None else "")
                + (f", {rate:.1f} rows/s, {p.get('tokens_per_s') or 0:.0f} tokens/s" if rate is not None else "")
                + f"; ETA generation {duration(p.get('eta_generation_s'))}, run {duration(p.get('eta_run_s'))}"
            )
        elif current.get("status") == "running":
            lines.append(f"{where}: started {current.get('started')}; "
                         + ("teacher scored, training starting" if current.get("targets") else "scoring or starting up"))
        else:
            lines.append(f"{where}: not started")
        last_sign = _parse_time(p.get("updated_at")) if p else _parse_time(current.get("started"))
        if status == "running" and last_sign is not None and (now - last_sign).total_seconds() > STALE_AFTER_S:
            lines.append(f"no progress since {last_sign.isoformat(timespec='seconds')} ({_ago(last_sign, now)}); "
                         "the job may have stopped — run the same `incr-ray train` command again to resume")
        elif p and p.get("updated_at"):
            lines.append(f"progress updated {p['updated_at']} ({_ago(_parse_time(p['updated_at']), now)})")
    if finished:
        last = finished[-1]
        lines.append(f"last finished: generation {last['index']}, {_metrics(last.get('metrics'))}")
    return "\n".join(lines)


def read_status(run_dir: str, now: datetime | None = None) -> str:
    """:func:`render_status` of the run folder ``run_dir`` (local or a storage URI)."""
    root = absolute(run_dir).rstrip("/")
    manifest_path = f"{root}/run.json"
    if not exists(manifest_path):
        raise RunError(f"{run_dir!r} is not an incr-ray run folder (no run.json); pass --run STORAGE/RUN_NAME")
    manifest = load(manifest_path).to_json()
    progress = None
    for entry in reversed(manifest.get("generations") or []):
        path = f"{root}/gen_{entry['index']:03d}/{PROGRESS_FILE}"
        try:
            progress = read_json(path) if exists(path) else None
        except (OSError, ValueError):  # being replaced, or unreadable: show the run without it
            progress = None
        if progress is not None or entry.get("status") != "pending":
            break
    return render_status(manifest, progress, now or datetime.now(timezone.utc))
