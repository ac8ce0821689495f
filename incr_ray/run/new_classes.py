"""New classes in an extension (``incr-ray extend --allow-new-labels``; docs/method.md#new-classes).

The new data's unseen labels are appended to the run's label map (:func:`incr_ray.data.read_new_block`;
old ids never change) and recorded with the generation that added them (``new_labels`` in
run.json). The teacher still scores only the classes it knows; its probabilities are padded with
zeros for the new ones before the target rule (:func:`incr_ray.method.targets.padded_probs`).
Here: the student's initial model, the teacher with its head grown for the new classes
(:func:`incr_ray.heads.grow_head_folder`), written once to ``gen_<g>/initial_model`` before any
training worker starts; and the evaluation a class-incremental run is read by (``old_new`` in
run.json): per holdout, accuracy on the old classes, on the new ones and overall, recall per
class, and the old classes' forgetting against the teacher on the same rows. The math is
:func:`incr_ray.method.metrics.old_new_split`; :func:`old_new_record` and :func:`old_new_lines`
shape it (pure), :func:`old_new_figures` finds the teacher's side (reads, and scores the teacher
on an extension's own holdout it never saw).
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import ray.data
from ray.data.expressions import col

from ..config import Config
from ..generation.evaluation import evaluate_model, read_predictions
from ..heads import grow_head_folder
from ..method.metrics import class_counts, old_new_split
from ..storage import is_remote, remove_tree, rename_tree, stage_local, upload_dir
from .preflight import check_head

RUN_HOLDOUT = "holdout"  # old_new's key of the run's holdout; an extension's own holdout is its generation


def check_new_labels(cfg: Config, base_model: str, label_names: list[str], grown: list[str]) -> None:
    """Before anything changes, when the new data grows the label map from ``label_names`` to
    ``grown``: a student that starts from the base model (``student.init: base``) draws a head for
    them at load, which a base with a trained head of another size cannot do under ZeRO-3 (the
    same check as a new run's)."""
    if len(grown) > len(label_names) and cfg.student.init == "base":
        check_head(cfg, base_model, len(grown))


def initial_model(run, g: int, teacher_model: str) -> str:
    """Generation ``g``'s initial model when it starts from its teacher (``student.init:
    previous``): ``teacher_model`` itself, or — when ``g`` knows more labels than its teacher —
    ``gen_<g>/initial_model``, the teacher with its head grown for them (old rows copied, new rows
    from ``run.seed``), made once (a resumed generation reads it back). ``run``: the open
    :class:`incr_ray.run.folder.Run`."""
    m = run.manifest
    names, known = m.label_names_of(g), m.teacher_labels(g)
    if len(names) == len(known):
        return teacher_model
    entry = m.entry(g)
    dest = run.paths.initial_model(g)
    if entry.initial_model:
        return run.paths.join(entry.initial_model)
    tmp = dest + ".tmp"
    remove_tree(tmp)
    with tempfile.TemporaryDirectory(prefix="incr-ray-head-") as scratch:
        local = f"{scratch}/model" if is_remote(dest) else tmp
        grow_head_folder(stage_local(teacher_model), local, names, run.cfg.run.seed, run.cfg.model.trust_remote_code)
        if is_remote(dest):
            upload_dir(local, tmp)
    rename_tree(tmp, dest)
    entry.initial_model = run.rel(dest)
    run.save()
    added = ", ".join(repr(n) for n in names[len(known):])
    run.say(f"[gen {g}] the teacher's head grown from {len(known)} to {len(names)} classes (new: {added}; "
            f"new rows from run.seed): {run.rel(dest)} is the student's initial model")
    return dest


def new_labels_line(manifest, g: int) -> str:
    """The console's line for the labels extension ``g`` appended to the label map, with their ids."""
    added = manifest.entry(g).new_labels or []
    first = len(manifest.label_names_of(g)) - len(added)
    return (f"generation {g} adds {len(added)} label(s) the run has never seen to its label map (--allow-new-labels): "
            + ", ".join(f"{first + i} = {name!r}" for i, name in enumerate(added)))


# ---------------------------------------------------------------------------------------------
# Old and new classes: the figures (pure), and where the teacher's side comes from


def old_new_record(label_names: list[str], old: int, added_by: int, before: int | None,
                   counts: dict[str, dict[str, list[int]]],
                   before_counts: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    """``entry.old_new`` of a generation whose label map ``label_names`` grew at ``added_by``: ids
    below ``old`` are the old classes. ``counts``: the generation's ``{"rows", "correct"}`` per
    class on each holdout (``holdout``, or an extension's generation); ``before_counts``: those of
    ``before`` (its teacher) on the same rows, where known. A figure over no rows is left out."""
    holdouts = {}
    for name, c in counts.items():
        prior = before_counts.get(name)
        same_rows = prior is not None and list(prior["rows"][:old]) == list(c["rows"][:old])
        split = old_new_split(c["rows"], c["correct"], range(old), prior["correct"] if same_rows else None)
        recall = split.pop("recall")
        figures = {k: v for k, v in split.items() if v is not None}
        figures["classes"] = {label: {"rows": int(rows), "correct": int(right), "recall": r}
                              for label, rows, right, r in zip(label_names, c["rows"], c["correct"], recall) if rows}
        holdouts[name] = figures
    return {"added_by": added_by, "old_classes": old, "new_labels": list(label_names[old:]),
            **({"before": before} if before is not None else {}), "holdouts": holdouts}


def holdout_name(name: str) -> str:
    return "the run's holdout" if name == RUN_HOLDOUT else f"gen {name}'s data"


def _forgetting(f: float) -> str:
    return f"forgetting {100 * f:.1f} points" if f >= 0 else f"no forgetting ({100 * -f:+.1f} points)"


RECALL_SHOWN = 12  # classes per console line; report.md has them all


def old_new_lines(g: int, record: dict[str, Any] | None, label_names: list[str]) -> list[str]:
    """The console's lines for ``record`` (generation ``g``'s ``old_new``): which classes are old
    and new, then per holdout the accuracy on each side with the old classes' forgetting, and the
    recall per class."""
    if not record:
        return []
    old = record["old_classes"]
    lines = [f"extension: old classes {', '.join(label_names[:old])}; new since gen {record['added_by']}: "
             f"{', '.join(record['new_labels'])}"]
    for name, h in record["holdouts"].items():
        sides = f"{h['old_rows']} rows of old classes" + (f", {h['new_rows']} of new" if h["new_rows"] else "")
        parts = []
        if "old_accuracy" in h:
            shift = (f" ({h['old_accuracy_before']:.4f} by gen {record['before']}, {_forgetting(h['forgetting'])})"
                     if "forgetting" in h else "")
            parts.append(f"old classes {h['old_accuracy']:.4f}{shift}")
        if "new_accuracy" in h:
            parts.append(f"new classes {h['new_accuracy']:.4f}")
        parts.append(f"all {h['accuracy']:.4f}")
        lines.append(f"extension, on {holdout_name(name)} ({sides}): gen {g} " + "; ".join(parts))
        recalls = [f"{label} {c['recall']:.4f}" for label, c in h["classes"].items()]
        more = len(recalls) - RECALL_SHOWN
        lines.append(f"extension, recall per class on {holdout_name(name)}: " + ", ".join(recalls[:RECALL_SHOWN])
                     + (f", and {more} more in report.md" if more > 0 else ""))
    return lines


def _counts_by_id(ids: np.ndarray, preds: np.ndarray, labelled, num_classes: int) -> dict[str, list[int]]:
    """Per-class counts of predictions ``(ids, preds)`` on the rows of ``labelled`` (row_id, label);
    a row without a prediction counts as wrong."""
    table = labelled.select_columns(["row_id", "label"]).to_pandas()
    predicted = dict(zip(np.asarray(ids, dtype=np.int64).tolist(), np.asarray(preds, dtype=np.int64).tolist()))
    found = np.array([predicted.get(int(i), -1) for i in table["row_id"]], dtype=np.int64)
    rows, correct = class_counts(table["label"].to_numpy(), found, num_classes)
    return {"rows": rows.tolist(), "correct": correct.tolist()}


def _teacher_counts(run, g: int, teacher, name: str, old: int, num_classes: int) -> dict[str, list[int]] | None:
    """The teacher's per-class counts on holdout ``name``: from its own ``old_new`` record, from its
    holdout predictions (the run's holdout), or — an extension's own holdout it never saw — by
    scoring it there now, on the old-class rows (the only ones the forgetting reads)."""
    names = run.manifest.label_names_of(g)
    recorded = ((teacher.old_new or {}).get("holdouts") or {}).get(name)
    if recorded:
        classes = recorded["classes"]
        return {"rows": [classes.get(n, {}).get("rows", 0) for n in names],
                "correct": [classes.get(n, {}).get("correct", 0) for n in names]}
    if name == RUN_HOLDOUT:
        if not teacher.predictions:
            return None
        return _counts_by_id(*read_predictions(run.paths.join(teacher.predictions)), run.holdout(), num_classes)
    own = run.manifest.entry(int(name)).own_holdout
    if not own:
        return None
    rows = ray.data.read_parquet(run.paths.join(own)).filter(expr=col("label") < old).materialize()
    if rows.count() == 0:
        return {"rows": [0] * num_classes, "correct": [0] * num_classes}
    run.say(f"[gen {g}] scoring its teacher (gen {teacher.index}) on the old classes' rows of {holdout_name(name)}, "
            "for their forgetting")
    _, predictions = evaluate_model(rows, run.paths.join(teacher.model), run.cfg, run.on_gpu, predictions=True,
                                    num_classes=num_classes)
    return _counts_by_id(*predictions, rows, num_classes)


def old_new_figures(run, g: int, teacher, counts: dict[str, dict[str, list[int]]] | None) -> dict[str, Any] | None:
    """``entry.old_new`` of generation ``g`` (:func:`old_new_record`), or None when no generation
    up to ``g`` added labels. ``counts``: ``g``'s per-class counts from its training workers
    (``class_counts``); None (a generation evaluated after its workers stopped) takes the run's
    holdout's from ``g``'s holdout predictions. ``run``: the open :class:`incr_ray.run.folder.Run`."""
    m = run.manifest
    split = m.class_split(g)
    if split is None:
        return None
    added_by, old = split
    names = m.label_names_of(g)
    if counts is None:
        entry = m.entry(g)
        if not entry.predictions:
            return None
        counts = {RUN_HOLDOUT: _counts_by_id(*read_predictions(run.paths.join(entry.predictions)),
                                             run.holdout(), len(names))}
    before = {}
    if teacher is not None:
        for name in counts:
            found = _teacher_counts(run, g, teacher, name, old, len(names))
            if found is not None:
                before[name] = found
    return old_new_record(names, old, added_by, teacher.index if teacher is not None else None, counts, before)
