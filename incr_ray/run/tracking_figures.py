"""What a run's tracking logs, as pure functions of run.json's dicts: the config as flat params, a
generation's entry and the finished run as metrics, a generation's tags (:mod:`incr_ray.run.tracking`
sends them)."""

from __future__ import annotations

import json
import re
from typing import Any

# MLflow's limit: characters per param value.
MAX_PARAM_CHARS = 6000
# Groups of a generation's entry in run.json that become its metrics, as "<group>/<name>".
ENTRY_GROUPS = {"metrics": "holdout", "teacher_on_block": "teacher_on_block", "suspects": "suspects",
                "continual": "continual",
                "validation": "validation", "calibration": "calibration", "train": "train"}
ENTRY_FIGURES = ("rows", "block_rows", "replay_rows", "scoring_seconds", "eval_seconds", "seconds")


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"student": {"lora": {"r": 8}}}`` -> ``{"student.lora.r": "8"}``; strings as they are,
    everything else as JSON (``null``, ``true``, lists)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return None


def metric_name(text: str) -> str:
    """``text`` with the characters an MLflow metric name may not hold (a label's) as ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", text)


def _old_new_metrics(record: dict[str, Any]) -> dict[str, float]:
    """``old_new/<holdout|gen_j>/<figure>`` and ``.../recall/<label>`` of a generation's ``old_new``."""
    out = {}
    for name, figures in (record.get("holdouts") or {}).items():
        prefix = "old_new/holdout" if name == "holdout" else f"old_new/gen_{name}"
        out.update({f"{prefix}/{k}": _number(v) for k, v in figures.items() if _number(v) is not None})
        for label, c in (figures.get("classes") or {}).items():
            if _number(c.get("recall")) is not None:
                out[f"{prefix}/recall/{metric_name(label)}"] = _number(c["recall"])
    return out


def generation_metrics(entry: dict[str, Any]) -> dict[str, float]:
    """A generation's figures from its run.json entry: ``holdout/accuracy``, ``teacher_on_block/kept``,
    ``continual/flip_rate``, ``train/train_seconds``, ``drift/gen_2/accuracy``,
    ``old_new/gen_2/forgetting``, ``generation/rows``..."""
    out: dict[str, float] = {}
    for field, group in ENTRY_GROUPS.items():
        for key, value in (entry.get(field) or {}).items():
            number = _number(value)
            if number is not None:
                out[f"{group}/{key}"] = number
    for j, figures in (entry.get("drift") or {}).items():
        for key, value in figures.items():
            if _number(value) is not None:
                out[f"drift/gen_{j}/{key}"] = _number(value)
    out.update(_old_new_metrics(entry.get("old_new") or {}))
    for key in ENTRY_FIGURES:
        if _number(entry.get(key)) is not None:
            out[f"generation/{key}"] = _number(entry[key])
    if entry.get("promoted") is not None:
        out["generation/promoted"] = float(entry["promoted"])
    return out


def final_metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The final model's holdout metrics as ``final/<name>``, and ``final/generation``."""
    from .report import final_entry

    final = final_entry(manifest)
    if final is None:
        return {}
    out = {f"final/{k}": float(v) for k, v in (final.get("metrics") or {}).items() if _number(v) is not None}
    out["final/generation"] = float(final["index"])
    return out


def generation_tags(entry: dict[str, Any], teacher: int | None, parent_id: str) -> dict[str, str]:
    tags = {"mlflow.parentRunId": parent_id, "generation": str(entry["index"]),
            "teacher": "none" if teacher is None else str(teacher)}
    if entry.get("extended"):
        tags.update(extended="true", source=str(entry.get("source")))
        # extend --set: how this generation trained differently from the run's params
        tags.update({f"extension.{k}": str(v) for k, v in (entry.get("settings") or {}).items()})
    return tags


def short_error(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return f"{type(err).__name__}: {text[:200]}"
