"""The ``README.md`` of every ``gen_NNN/model/`` folder: a Hugging Face model card.

:func:`render_model_card` is pure: from the run's manifest and a generation index it writes the
card's text — a YAML header the Hub and ``huggingface_hub.ModelCard`` read (base model, library,
pipeline tag, tags, labels, holdout accuracy and macro-F1 as a ``model-index``) and a body for a
reader of the Hub: how the generation was trained, its teacher chain back to the base model, the
data, every generation's holdout figures up to it, and how to load it. The card names no local
path but the data sources the user configured; a base model that is a local folder is named by
its folder name only, and left out of ``base_model`` (the Hub wants a repo id there).

:func:`write_model_card` is the one place that writes it, through :mod:`incr_ray.storage`.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..config import Config, config_from_dict
from ..method.suspects import TREATED
from ..storage import is_remote, write_bytes_atomic
from .manifest import GenerationEntry, Manifest
from .report_tables import old_new_markdown

CARD_NAME = "README.md"
TAGS = ["incr-ray", "text-classification", "knowledge-distillation"]
# model.base aliases and the Hub repo they are a copy of.
HUB_ALIASES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# A Hub repo id: NAME or OWNER/NAME, each part letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_base_model(base: str, local_folder: bool) -> str | None:
    """The Hub repo id ``model.base`` stands for, or None when it is a folder (local or remote)."""
    if base in HUB_ALIASES:
        return HUB_ALIASES[base]
    if local_folder or is_remote(base) or base.startswith(("file://", ".", "/", "~")):
        return None
    return base if _HUB_ID.match(base) else None


def _base_shown(base: str, hub_id: str | None) -> str:
    """The base model as the card names it: its Hub id, else the last part of its folder's path."""
    if hub_id:
        return f"[`{hub_id}`](https://huggingface.co/{hub_id})"
    name = PurePosixPath(base.rstrip("/").split("://")[-1]).name or base
    return f"a model folder named `{name}`"


def teachers_of(manifest: Manifest, g: int) -> list[int]:
    """The generations that taught ``g``, oldest first: the members of its ensemble as run.json
    recorded them (``teacher.ensemble``), else its one teacher; none for generation 0."""
    entry = manifest.generations[g]
    if entry.ensemble:
        return list(entry.ensemble)
    teacher = manifest.teacher_of(g)
    return [teacher.index] if teacher is not None else []


def teacher_chain(manifest: Manifest, g: int) -> list[int]:
    """[g, its teacher, that one's teacher, …, 0]: the generations whose knowledge reached ``g``,
    newest first; with ``teacher.ensemble`` every member of every ensemble on the way. A student
    the generation gate did not promote teaches nobody, so it is never in a chain."""
    reached, todo = {g}, [g]
    while todo:
        for t in teachers_of(manifest, todo.pop()):
            if t not in reached:
                reached.add(t)
                todo.append(t)
    return sorted(reached, reverse=True)


def final_generation(manifest: Manifest) -> int | None:
    """The generation whose model is the finished run's result (``final_generation``, or for a run
    folder from before that field the last promoted one); None while the run is not finished."""
    if manifest.status != "finished":
        return None
    if manifest.final_generation is not None:
        return manifest.final_generation
    last = manifest.teacher_of(len(manifest.generations))
    return last.index if last is not None else None


def _num(x: Any, fmt: str = ".4f") -> str:
    return "–" if x is None else format(x, fmt)


def _metadata(manifest: Manifest, g: int, hub_id: str | None) -> dict[str, Any]:
    m = manifest.generations[g].metrics or {}
    meta: dict[str, Any] = {}
    if hub_id:
        meta["base_model"] = hub_id
    meta.update(library_name="transformers", pipeline_tag="text-classification", tags=list(TAGS),
                labels=manifest.label_names_of(g), metrics=["accuracy", "f1"])
    results = [{"type": "accuracy", "name": "holdout accuracy", "value": round(float(m["accuracy"]), 4)}
               if "accuracy" in m else None,
               {"type": "f1", "name": "holdout macro-F1", "value": round(float(m["macro_f1"]), 4),
                "args": {"average": "macro"}} if "macro_f1" in m else None]
    results = [r for r in results if r]
    if results:
        meta["model-index"] = [{
            "name": f"{manifest.name}-gen_{g:03d}",
            "results": [{
                "task": {"type": "text-classification", "name": "Text Classification"},
                "dataset": {"type": "holdout", "name": f"run {manifest.name} holdout ({manifest.data.holdout_size} rows)",
                            "split": "holdout"},
                "metrics": results,
            }],
        }]
    return meta


def _ensemble_text(members: list[int], n: int) -> str:
    """The card's "teacher" row under ``teacher.ensemble`` ``n``."""
    if len(members) < 2:
        return (f"generation {members[0] if members else '–'} alone (teacher.ensemble {n}: no other promoted "
                "generation before it)")
    return (f"the mean of the softmaxes (at τ) of generations {', '.join(map(str, members))} (teacher.ensemble {n}: "
            "the last promoted generations), each padded with zeros for classes it never saw")


def _training_rows(cfg: Config, manifest: Manifest, entry: GenerationEntry) -> list[tuple[str, str]]:
    """(setting, value) lines of the card's "How it was trained" table."""
    m, s = cfg.method, cfg.student
    g = entry.index
    rows = [("method", f"incremental teacher-student, k = {m.k} blocks"
             + ("; this generation extends the finished run with new data" if entry.extended else ""))]
    if g == 0:
        rows.append(("targets", "one-hot labels (generation 0 learns from the labels alone)"))
    else:
        rows += [
            ("threshold p", f"{m.threshold:g} (a row whose teacher gives the true class less than p gets that "
             "class pushed to p, the others shrunk in proportion)"),
            ("floor f", "none" if m.floor is None else f"{m.floor:g} (rows below it get one-hot targets)"),
            ("temperature τ", f"{m.temperature:g}"),
            *([("teacher", _ensemble_text(teachers_of(manifest, g), cfg.teacher.ensemble))]
              if cfg.teacher.ensemble > 1 else []),
            ("α (hard-label weight)", f"{m.alpha:g}"),
        ]
        if m.anneal:
            rows.append(("teacher annealing", "on: targets move from the teacher's to one-hot over the generation"))
        if entry.suspects:
            sp = entry.suspects
            treated = TREATED[sp["policy"]]
            rows.append(("suspected label errors", f"{sp['rows']} of {sp['block_rows']} block rows "
                         f"({100 * sp['share']:.1f}%) got under {sp['below']:g} of the teacher for their label; "
                         f"{treated}"))
    rows.append(("initialised from", "the base model" if g == 0 or s.init == "base" else "its teacher's weights"))
    if m.validation_fraction > 0:
        v = entry.validation or {}
        rows.append(("validation slice", f"{m.validation_fraction:g} of each block kept out of training"
                     + (f" ({int(v['rows'])} rows here)" if "rows" in v else "")))
    if m.keep_best:
        rows.append(("generation gate", "on: a student worse than its teacher on the validation slice (accuracy, "
                     "then NLL) is not promoted"))
    if m.calibrate:
        c = entry.calibration or {}
        rows.append(("temperature scaling", f"temperature {c['temperature']:.3f} fitted on the validation slice and "
                     f"folded into the classification head (holdout ECE {c['ece_before']:.4f} → {c['ece_after']:.4f})"
                     if {"temperature", "ece_before", "ece_after"} <= set(c) else "on (no temperature fitted here)"))
    if cfg.replay.fraction > 0 and g > 0:
        rows.append(("replay", f"{cfg.replay.fraction:g} × the block's rows re-sampled from earlier blocks"))
    if entry.memory:
        mem = entry.memory
        how = "by herding on the teacher's features" if mem["selection"] == "herding" else "at random"
        rows.append(("memory", f"{mem['rows']} rows of {mem['classes']} old classes (up to {mem['per_class']} a "
                     f"class) replayed, chosen {how}"))
    balanced = (entry.train or {}).get("balanced")
    if balanced:
        rows.append(("balanced fine-tuning", f"{balanced['steps']} optimizer steps on {balanced['rows']} rows "
                     f"({balanced['per_class']} a class) at learning rate {balanced['learning_rate']:g}, "
                     "after the main training"))
    if s.lora.r > 0:
        targets = ", ".join(s.lora.target_modules) if s.lora.target_modules else "the attention projections"
        rows.append(("LoRA", f"rank {s.lora.r}, alpha {s.lora.alpha:g}, dropout {s.lora.dropout:g} on {targets}; "
                     "merged into the weights of this folder"))
    at_least = f" (at least {s.min_steps} optimizer steps)" if s.min_steps else ""
    rows.append(("student", f"{s.epochs:g} epoch(s){at_least}, learning rate "
                 f"{s.learning_rate:g} (schedule `{s.schedule}`, warmup {s.warmup_ratio:g}), weight decay "
                 f"{s.weight_decay:g}, batch {s.batch_size} × {s.grad_accum} accumulation per worker"))
    t = entry.train or {}
    if t:
        precision = (t.get("precision") or {}).get("model_weights")
        rows.append(("this generation", ", ".join(part for part in (
            f"{t['rows']} training rows" if "rows" in t else None,
            f"{t['steps']} optimizer steps" if "steps" in t else None,
            f"{t['workers']} worker(s)" if "workers" in t else None,
            f"DeepSpeed ZeRO-{t['zero_stage']}" if "zero_stage" in t else None,
            f"{precision} weights" if precision else None) if part)))
    rows += [("max length", f"{cfg.model.max_length} tokens"), ("seed", str(cfg.run.seed))]
    return rows


def _chain_lines(manifest: Manifest, g: int, cfg: Config, base: str) -> list[str]:
    chain = teacher_chain(manifest, g)
    arrow = " ← ".join(f"gen {i}" for i in chain) + f" ← base model ({base})"
    lines = [arrow, ""]
    for i in chain:
        e = manifest.generations[i]
        rows = e.block_rows or e.rows
        what = f"{rows} rows of " if rows else ""
        block = f"the new data `{e.source}`" if e.extended and e.source else f"block {i}"
        if i == 0:
            lines.append(f"- generation 0: the base model fine-tuned on {what}{block} with one-hot labels")
        else:
            t, members = manifest.teacher_of(i), teachers_of(manifest, i)
            init = "the base model" if cfg.student.init == "base" else f"generation {t.index}'s weights"
            who = (f"generation {t.index}" if len(members) < 2 else
                   f"the mean softmax of generations {', '.join(map(str, members))} (teacher.ensemble)")
            lines.append(f"- generation {i}: student of {who} on {what}{block}, initialised from {init}")
    skipped = [e.index for e in manifest.generations[:g]
               if e.promoted is False and e.index not in chain]
    if skipped:
        lines += ["", f"Not in the chain: generation(s) {', '.join(map(str, skipped))}, trained but not promoted by "
                  "the generation gate (worse than their teacher on the validation slice), so they taught "
                  "no one."]
    return lines


def _data_lines(manifest: Manifest, g: int, cfg: Config) -> list[str]:
    d = manifest.data
    source = f"`{cfg.data.source}`" + (f" (split `{cfg.data.split}`)" if cfg.data.split else "")
    holdout = (f"the separate file `{cfg.data.eval_path}`" if cfg.data.eval_path
               else f"split `{cfg.data.eval_split}`" if cfg.data.eval_split
               else f"a seeded {cfg.data.eval_fraction:g} share of the rows")
    lines = [f"- source: {source}" + (f", about {cfg.data.max_rows} rows sampled" if cfg.data.max_rows else ""),
             f"- fingerprint: `{d.fingerprint}`",
             f"- holdout: {d.holdout_size} rows, {holdout}; never trained on",
             "- labels: " + ", ".join(f"{i} = `{name}`" for i, name in enumerate(manifest.label_names_of(g))),
             "", "| block | rows | trained generation |", "|---:|---:|---:|"]
    for i in range(g + 1):
        e = manifest.generations[i] if i < len(manifest.generations) else None
        rows = d.block_sizes[i] if i < len(d.block_sizes) else (e.block_rows or e.rows if e else None)
        origin = f" (new data `{e.source}`)" if e is not None and e.extended and e.source else ""
        lines.append(f"| {i}{origin} | {_num(rows, 'd')} | {i} |")
    return lines


def _holdout_table(manifest: Manifest, g: int, chain: list[int]) -> list[str]:
    lines = ["| gen | kind | accuracy | macro-F1 | NLL | ECE |", "|---:|---|---:|---:|---:|---:|"]
    for e in manifest.generations[:g + 1]:
        if not e.metrics:
            continue
        kind = "one-hot" if e.index == 0 else ("extension" if e.extended else "soft targets")
        if e.promoted is False:
            kind += ", not promoted"
        elif e.index not in chain:
            kind += ", not in this chain"
        m = e.metrics
        cells = [str(e.index), kind, *(_num(m.get(k)) for k in ("accuracy", "macro_f1", "nll", "ece"))]
        if e.index == g:
            cells = [f"**{c}**" for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _old_new_lines(manifest: Manifest, g: int) -> list[str]:
    """The card's section on old and new classes, for a generation at or after an extension that
    added labels (``old_new`` in run.json); none for the others."""
    record = manifest.generations[g].old_new
    if not record:
        return []
    names = manifest.label_names_of(g)
    old = record["old_classes"]
    return [
        "## Old and new classes", "",
        f"Generation {record['added_by']} added {', '.join(f'`{n}`' for n in record['new_labels'])} to the "
        f"{old} labels known before ({', '.join(f'`{n}`' for n in names[:old])}). Accuracy on the old classes, on "
        "the new ones and on all, on the run's holdout and on each extension's own; before: the old classes' accuracy "
        f"by this generation's teacher (generation {record.get('before', '–')}) on the same rows; forgetting: before − "
        "after, positive when the old classes lost accuracy.", "",
        old_new_markdown([manifest.generations[g].model_dump(mode="json", exclude_none=True)], names)]


def render_model_card(manifest: Manifest, g: int, base_is_local_folder: bool = False) -> str:
    """The model card (``README.md``) of generation ``g``'s model folder.

    ``manifest`` holds ``g``'s entry with its holdout ``metrics``; ``base_is_local_folder`` says
    that ``model.base`` names a folder on this machine (a relative path can look like a Hub id).
    The card calls ``g`` the run's final model when the run is finished and names it so.
    """
    cfg = config_from_dict(manifest.config_of(g))  # an extension may train with its own settings
    entry = manifest.generations[g]
    hub_id = hub_base_model(cfg.model.base, base_is_local_folder)
    base = _base_shown(cfg.model.base, hub_id)
    chain = teacher_chain(manifest, g)
    final = final_generation(manifest)
    is_final = final == g

    header = yaml.safe_dump(_metadata(manifest, g, hub_id), sort_keys=False, allow_unicode=True)
    if is_final:
        standing = f"This is the **final model** of run `{manifest.name}`."
    elif final is not None:
        standing = f"Run `{manifest.name}`'s final model is generation {final}."
    else:
        standing = "Written when this generation finished, while the run went on."
    if entry.promoted is False:
        teacher = manifest.teacher_of(g)
        standing += (f" This generation was not promoted: on the validation slice it was worse (accuracy, then NLL) than its "
                     f"teacher, generation {teacher.index}, which stayed the teacher of the next generation.")
    m = entry.metrics or {}
    names = manifest.label_names_of(g)
    labels = ", ".join(f"`{name}`" for name in names)
    body = [
        f"# {manifest.name}: generation {g}", "",
        f"A text classifier ({len(names)} labels: {labels}) fine-tuned from {base} with incr-ray's "
        "incremental teacher-student training: the training data is cut into blocks; generation 0 is the base "
        "model fine-tuned on block 0 with one-hot labels, and every later generation is a student trained on the "
        "next block against soft targets from its teacher — the previous generation's probabilities"
        + (f" (here the mean of the last {cfg.teacher.ensemble} generations')" if cfg.teacher.ensemble > 1 else "")
        + f", with the true class raised to at least p. This is generation {g} of run `{manifest.name}`. {standing}", "",
        f"Holdout ({manifest.data.holdout_size} rows): accuracy {_num(m.get('accuracy'))}, macro-F1 "
        f"{_num(m.get('macro_f1'))}, NLL {_num(m.get('nll'))}, ECE {_num(m.get('ece'))}.", "",
        "## How it was trained", "", "| setting | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in _training_rows(cfg, manifest, entry)), "",
        "## Teacher chain", "", *_chain_lines(manifest, g, cfg, base), "",
        "## Data", "", *_data_lines(manifest, g, cfg), "",
        f"## Holdout metrics, generations 0–{g}", "",
        "On the run's holdout; NLL is the mean log loss, ECE the expected calibration error "
        f"({cfg.eval.ece_bins} equal-width bins).", "", *_holdout_table(manifest, g, chain), "",
        *_old_new_lines(manifest, g),
        "## How to load", "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("text-classification", model="{manifest.name}/gen_{g:03d}/model")  '
        "# this folder, or its Hub repo id",
        'print(classifier("a gorgeous, moving film"))',
        "```", "",
        "or, with incr-ray installed:", "",
        "```bash",
        f'incr-ray predict --model {manifest.name}/gen_{g:03d}/model "a gorgeous, moving film"',
        "```", "",
        "The folder holds `model.safetensors`, `config.json` (with the label names), the tokenizer, and "
        "`incr_ray.json`: the run's resolved configuration.",
    ]
    return f"---\n{header}---\n\n" + "\n".join(body) + "\n"


def write_model_card(model_dir: str, manifest: Manifest, g: int) -> str:
    """Render generation ``g``'s card into ``model_dir/README.md`` (local or remote); returns its path."""
    base = config_from_dict(manifest.config).model.base
    local = not is_remote(base) and base not in HUB_ALIASES and Path(base.removeprefix("file://")).expanduser().exists()
    path = model_dir.rstrip("/") + "/" + CARD_NAME
    write_bytes_atomic(path, render_model_card(manifest, g, base_is_local_folder=local).encode("utf-8"))
    return path
