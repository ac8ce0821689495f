"""New classes in an extension (``incr-ray extend --allow-new-labels``; docs/method.md#new-classes).

The new data's unseen labels are appended to the run's label map (:func:`incr_ray.data.read_new_block`;
old ids never change) and recorded with the generation that added them (``new_labels`` in
run.json). The teacher still scores only the classes it knows; its probabilities are padded with
zeros for the new ones before the target rule (:func:`incr_ray.method.targets.padded_probs`).
Here: the student's initial model, the teacher with its head grown for the new classes
(:func:`incr_ray.heads.grow_head_folder`), written once to ``gen_<g>/initial_model`` before any
training worker starts.
"""

from __future__ import annotations

import tempfile

from ..config import Config
from ..heads import grow_head_folder
from ..storage import is_remote, remove_tree, rename_tree, stage_local, upload_dir
from .preflight import check_head


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
