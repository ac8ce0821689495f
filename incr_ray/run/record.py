"""What a student's fit leaves in its generation's run.json entry, and the console lines about it.

Pure: the loop hands in what the workers returned (``fit_student``'s metrics dict) and what it read
from storage (the teacher's figures on the validation slice, the flip rates against the teacher);
the tests use plain dicts.
"""

from __future__ import annotations

from typing import Any

from ..method.calibration import MIN_ROWS as MIN_CALIBRATION_ROWS
from .manifest import GenerationEntry


def continual_record(g: int, teacher: GenerationEntry | None, flips: dict[str, float] | None,
                     retention: dict[str, Any] | None) -> tuple[dict[str, float] | None, list[str]]:
    """(``entry.continual``, its line): the flip and fix rates against ``teacher`` on the holdout
    (``flips``: ``flip_rate``, ``fix_rate``) and the accuracy on a sample of earlier blocks
    (``retention``: ``accuracy``, ``nll``, ``rows``); (None, []) when there is neither."""
    out: dict[str, float] = {}
    parts = []
    if flips and teacher is not None:
        out.update(flip_rate=flips["flip_rate"], fix_rate=flips["fix_rate"])
        parts.append(f"against its teacher (gen {teacher.index}) {100 * out['flip_rate']:.1f}% of holdout rows "
                     f"went right → wrong, {100 * out['fix_rate']:.1f}% wrong → right")
    if retention:
        out.update(retention_accuracy=retention["accuracy"], retention_nll=retention["nll"],
                   retention_rows=retention["rows"])
        parts.append(f"accuracy {out['retention_accuracy']:.4f} on {int(out['retention_rows'])} rows of earlier blocks")
    if not out:
        return None, []
    return out, [f"[gen {g}] " + "; ".join(parts)]


def _calibration_line(g: int, calibration: dict[str, float], rows: int) -> str:
    c = calibration
    if rows < MIN_CALIBRATION_ROWS:
        return (f"[gen {g}] no temperature fitted: the validation slice has {rows} rows, fewer than "
                f"{MIN_CALIBRATION_ROWS}; raise method.validation_fraction")
    return (f"[gen {g}] temperature {c['temperature']:.3f} fitted on {rows} validation rows: holdout "
            f"ECE {c['ece_before']:.4f} → {c['ece_after']:.4f}, NLL {c['nll_before']:.4f} → {c['nll_after']:.4f}")


def ewc_without_anchor_line(g: int, ewc: float, teacher) -> str | None:
    """The warning when generation ``g`` asks for EWC but its teacher stored no Fisher information
    (it trained with ``method.ewc: 0``, e.g. ``extend --set method.ewc=…`` on such a run): the
    student trains without the penalty and stores its own Fisher for the next one. None otherwise."""
    if not ewc or teacher is None or teacher.fisher:
        return None
    return (f"[gen {g}] warning: method.ewc={ewc:g} but gen {teacher.index} stored no Fisher information (it "
            "trained with method.ewc 0), so this student trains without the EWC penalty; it stores its own "
            "Fisher, and the next generation is held toward it")


def ewc_lines(g: int, ewc: dict[str, Any] | None) -> list[str]:
    """What EWC did in generation ``g`` (``entry.ewc``): the penalty against its teacher's Fisher,
    and this model's own Fisher, stored for the next student."""
    if not ewc:
        return []
    lines = []
    if "penalty_mean" in ewc:
        lines.append(f"[gen {g}] EWC λ={ewc['lambda']:g} against gen {ewc['anchor_generation']}'s Fisher "
                     f"({ewc['params']:,} weights): penalty {ewc['penalty_first']:.3g} at the first batch, "
                     f"{ewc['penalty_last']:.3g} at the last ({100 * ewc['share_last']:.1f}% of its loss), "
                     f"mean {ewc['penalty_mean']:.3g}")
    fisher = ewc.get("fisher")
    if fisher:
        lines.append(f"[gen {g}] Fisher information on {fisher['rows']} rows stored for the next student "
                     f"({fisher['params']:,} weights, {fisher['bytes'] / 2**20:.1f} MiB, {fisher['seconds']:.1f} s)")
    return lines


def record_fit(entry: GenerationEntry, train: dict[str, Any], teacher: GenerationEntry | None = None,
               teacher_validation: dict[str, float] | None = None,
               flips: dict[str, float] | None = None) -> list[str]:
    """Copy a fit's metrics (``train``, as ``fit_student`` returned them; left as it is) into its
    generation's ``entry`` and return the console lines that say what they show.

    The holdout metrics and their seconds, the validation slice (``teacher_validation``, the
    teacher's figures there, beside the student's), the fitted temperature, the drift on each
    extension's own holdout, the continual figures (:func:`continual_record`: ``flips``
    against ``teacher``, the retention sample) and EWC's (:func:`ewc_lines`) get their own fields;
    the rest becomes ``entry.train``.
    """
    g, rest = entry.index, dict(train)
    entry.metrics, entry.eval_seconds = rest.pop("holdout"), rest.pop("eval_seconds")
    validation, entry.calibration = rest.pop("validation", None), rest.pop("calibration", None)
    retention, entry.drift = rest.pop("retention", None), rest.pop("drift", None)
    rest.pop("class_counts", None)  # per-class counts: the loop makes them entry.old_new (run/new_classes.py)
    lines = []
    if entry.drift:
        lines.append(f"[gen {g}] on the extensions' own holdouts: " + ", ".join(
            f"gen {j}'s data acc {d['accuracy']:.4f}" for j, d in entry.drift.items()))
    if validation is not None:
        entry.validation = {**validation, **(teacher_validation or {})}
    if entry.calibration:
        lines.append(_calibration_line(g, entry.calibration, int((validation or {}).get("rows", 0))))
    entry.continual, said = continual_record(g, teacher, flips, retention)
    entry.ewc = rest.pop("ewc", None)
    entry.train = rest
    return lines + said + ewc_lines(g, entry.ewc)
