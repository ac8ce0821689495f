"""report.md's tables of what the method's levers did, generation by generation: the teacher on
its block, calibration, EWC, the memory, drift over the extensions' holdouts and the old and new
classes. Each reads the generations as ``run.json`` holds them and returns None when no generation
carries its field (run folders written by older versions still report).
"""

from __future__ import annotations

import math
from typing import Any

DASH = "–"


def cell(x: Any, fmt: str) -> str:
    """``x`` formatted, or a dash when it is missing (None, absent, NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return format(x, fmt)


def pct_cell(x: Any) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def teacher_table_markdown(generations: list[dict[str, Any]]) -> str | None:
    """What the teacher and the target rule did, per generation ≥ 1; None when no generation
    recorded it (a run folder from before ``teacher_on_block``, or k = 1)."""
    rows = [e for e in generations if e["index"] >= 1]
    if not any(e.get("teacher_on_block") for e in rows):
        return None
    suspects = any(e.get("suspects") for e in rows)
    ensemble = any(e.get("ensemble") for e in rows)  # teacher.ensemble > 1: which generations taught
    head = ("| gen |" + (" teacher: mean of gens |" if ensemble else "")
            + " block rows | teacher accuracy | teacher NLL | kept | pushed | floored "
            "| mean target entropy (nats) |" + (" suspected label errors |" if suspects else "") + "\n")
    head += ("|---:|" + ("---|" if ensemble else "") + "---:|---:|---:|---:|---:|---:|---:|"
             + ("---:|" if suspects else "") + "\n")
    lines = []
    for e in rows:
        t = e.get("teacher_on_block") or {}
        block_rows = t.get("rows", e.get("block_rows"))
        cells = [str(e["index"])] + ([", ".join(map(str, e["ensemble"])) if e.get("ensemble") else DASH]
                                     if ensemble else [])
        cells += [cell(int(block_rows) if block_rows is not None else None, "d"),
                 cell(t.get("accuracy"), ".4f"), cell(t.get("nll"), ".4f"), pct_cell(t.get("kept")),
                 pct_cell(t.get("pushed")), pct_cell(t.get("floored")), cell(t.get("target_entropy"), ".3f")]
        if suspects:
            sp = e.get("suspects")
            cells.append(f"{sp['rows']} ({pct_cell(sp['share'])}, {sp['policy']})" if sp else DASH)
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def calibration_table_markdown(generations: list[dict[str, Any]]) -> str | None:
    """Temperature scaling per generation; None when no generation was calibrated."""
    rows = [e for e in generations if e.get("calibration")]
    if not rows:
        return None
    head = "| gen | temperature | ECE before | ECE after | NLL before | NLL after |\n"
    head += "|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for e in rows:
        c = e["calibration"]
        cells = [str(e["index"]), cell(c.get("temperature"), ".3f"), cell(c.get("ece_before"), ".4f"),
                 cell(c.get("ece_after"), ".4f"), cell(c.get("nll_before"), ".4f"), cell(c.get("nll_after"), ".4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def ewc_table_markdown(generations: list[dict[str, Any]]) -> str | None:
    """EWC per generation (method.ewc): the penalty against the teacher's Fisher and the Fisher
    each generation stored; None when EWC was off."""
    rows = [e for e in generations if e.get("ewc")]
    if not rows:
        return None
    head = ("| gen | λ | against gen | weights penalised | penalty at first batch | at last batch "
            "| mean | share of last loss | own Fisher rows | file MiB | Fisher seconds |\n")
    head += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for e in rows:
        w, f = e["ewc"], e["ewc"].get("fisher") or {}
        cells = [str(e["index"]), cell(w.get("lambda"), "g"), cell(w.get("anchor_generation"), "d"),
                 cell(w.get("params"), ",d"), cell(w.get("penalty_first"), ".3g"), cell(w.get("penalty_last"), ".3g"),
                 cell(w.get("penalty_mean"), ".3g"), pct_cell(w.get("share_last")), cell(f.get("rows"), "d"),
                 cell(f["bytes"] / 2**20 if "bytes" in f else None, ".1f"), cell(f.get("seconds"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def memory_table_markdown(generations: list[dict[str, Any]]) -> str | None:
    """The memory each generation replayed (replay.per_class) and its balanced fine-tuning
    (student.balanced_epochs); None when no generation had either."""
    rows = [e for e in generations if e.get("memory") or (e.get("train") or {}).get("balanced")]
    if not rows:
        return None
    head = ("| gen | selection | rows | old classes | up to a class | candidates | mean distance "
            "| balanced rows | balanced steps | balanced learning rate |\n")
    head += "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for e in rows:
        m, b = e.get("memory") or {}, (e.get("train") or {}).get("balanced") or {}
        cells = [str(e["index"]), m.get("selection", "–"), cell(m.get("rows"), "d"), cell(m.get("classes"), "d"),
                 cell(m.get("per_class"), "d"), cell(m.get("candidates"), "d"), cell(m.get("mean_distance"), ".4f"),
                 cell(b.get("rows"), "d"), cell(b.get("steps"), "d"), cell(b.get("learning_rate"), "g")]
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def drift_matrix(generations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The accuracy matrix of a run extended with ``--holdout-fraction``, and its backward transfer.

    Tasks (columns): the run's own holdout, then each extension that held out part of its data.
    Rows: the generations from the one before the first such extension on. Backward transfer, as
    in Lopez-Paz & Ranzato (2017) and Avalanche: the mean, over every task but the last model's
    own, of (the last generation's accuracy on it − the accuracy right after it was learned).
    None when no extension held data out.
    """
    tasks = [e["index"] for e in generations if e.get("own_holdout")]
    if not tasks:
        return None
    first = min(tasks)
    rows = [e for e in generations if e["index"] >= first - 1]

    def acc(e: dict[str, Any], task: int | None) -> float | None:
        if task is None:
            return (e.get("metrics") or {}).get("accuracy")
        return ((e.get("drift") or {}).get(str(task)) or {}).get("accuracy")

    matrix = [{"generation": e["index"], "holdout": acc(e, None), **{str(t): acc(e, t) for t in tasks}} for e in rows]
    last = rows[-1]
    right_after = {None: acc(rows[0], None), **{t: acc(next(e for e in rows if e["index"] == t), t) for t in tasks}}
    changes = [acc(last, t) - a for t, a in right_after.items()
               if t != last["index"] and a is not None and acc(last, t) is not None]
    return {"tasks": ["holdout", *map(str, tasks)], "rows": matrix,
            "backward_transfer": sum(changes) / len(changes) if changes else None}


def drift_markdown(drift: dict[str, Any]) -> str:
    head = "| gen | run's holdout | " + " | ".join(f"gen {t}'s data" for t in drift["tasks"][1:]) + " |\n"
    head += "|---:|" + "---:|" * len(drift["tasks"]) + "\n"
    lines = ["| " + " | ".join([str(r["generation"]), *(cell(r[t], ".4f") for t in drift["tasks"])]) + " |"
             for r in drift["rows"]]
    bwt = drift["backward_transfer"]
    note = ("" if bwt is None else f"\nBackward transfer (last generation vs right after each data set was "
            f"learned, mean): {100 * bwt:+.1f} points.\n")
    return head + "\n".join(lines) + "\n" + note


def _data_set(name: str) -> str:
    return "run's holdout" if name == "holdout" else f"gen {name}'s data"


def old_new_markdown(generations: list[dict[str, Any]], label_names: list[str]) -> str | None:
    """Old and new classes per generation and data set (``old_new``), then recall per class; None
    when no generation's label map grew."""
    rows = [e for e in generations if e.get("old_new")]
    if not rows:
        return None
    head = ("| gen | data set | rows old / new | old classes | old classes before (gen) | forgetting "
            "| new classes | all |\n|---:|---|---:|---:|---:|---:|---:|---:|\n")
    recall_head = ("| gen | data set | " + " | ".join(f"`{n}`" for n in label_names) + " |\n"
                   + "|---:|---|" + "---:|" * len(label_names) + "\n")
    lines, recalls = [], []
    for e in rows:
        record = e["old_new"]
        for name, h in record["holdouts"].items():
            before = (f"{cell(h['old_accuracy_before'], '.4f')} (gen {record['before']})"
                      if "old_accuracy_before" in h else DASH)
            forgetting = h.get("forgetting")
            lines.append("| " + " | ".join([
                str(e["index"]), _data_set(name), f"{h['old_rows']} / {h['new_rows']}", cell(h.get("old_accuracy"), ".4f"),
                before, DASH if forgetting is None else f"{100 * forgetting:+.1f} points",
                cell(h.get("new_accuracy"), ".4f"), cell(h.get("accuracy"), ".4f")]) + " |")
            classes = h.get("classes") or {}
            recalls.append("| " + " | ".join([str(e["index"]), _data_set(name), *(
                cell((classes.get(n) or {}).get("recall"), ".4f") for n in label_names)]) + " |")
    return head + "\n".join(lines) + "\n\nRecall per class (– : no rows of the class there):\n\n" + recall_head + \
        "\n".join(recalls) + "\n"
