"""The human-readable end of a run: the per-generation tables, report.md/json and the metrics plot.

Everything here reads the manifest as ``run.json`` holds it (a dict, absent fields left out), and
renders a field a generation entry may lack — ``teacher_on_block``, ``promoted``, ``continual``,
``calibration`` — only where it is present, so run folders written by older versions still report.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

METRICS = ("accuracy", "macro_f1", "nll", "ece")
DASH = "–"


def _num(x: Any, fmt: str) -> str:
    """``x`` formatted, or a dash when it is missing (None, absent, NaN)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return DASH
    return format(x, fmt)


def _pct(x: Any) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def finished(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [g for g in manifest["generations"] if g.get("status") == "finished"]


def final_entry(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The generation whose model is the run's result: ``final_generation`` when the manifest
    names one (a generation gate may keep an earlier model), else the last finished one."""
    gens = finished(manifest)
    chosen = manifest.get("final_generation")
    if chosen is not None:
        for g in gens:
            if g["index"] == chosen:
                return g
    return gens[-1] if gens else None


def _kind(e: dict[str, Any]) -> str:
    kind = "one-hot" if e["index"] == 0 else ("extend" if e.get("extended") else "soft targets")
    return kind + (", not promoted" if e.get("promoted") is False else "")


def extension_change(generations: list[dict[str, Any]], e: dict[str, Any]) -> dict[str, Any] | None:
    """For an extended generation: holdout accuracy of its teacher (the last earlier generation that
    was promoted) and of this one, and the change in points; None when either is unknown."""
    before = [g for g in generations if g["index"] < e["index"] and g.get("promoted") is not False]
    if not e.get("extended") or not before:
        return None
    prev = before[-1]
    a0 = (prev.get("metrics") or {}).get("accuracy")
    a1 = (e.get("metrics") or {}).get("accuracy")
    if a0 is None or a1 is None:
        return None
    delta = 100 * (a1 - a0)
    return {"previous_generation": prev["index"], "accuracy_before": a0, "accuracy_after": a1,
            "delta_points": delta, "worse": a1 < a0}


def summary_line(entry: dict[str, Any], k: int) -> str:
    m = entry.get("metrics") or {}
    train = entry.get("train") or {}
    return (
        f"gen {entry['index']}/{k - 1}  rows {entry.get('rows', 0):>6}  "
        f"acc {m.get('accuracy', float('nan')):.4f}  macro-F1 {m.get('macro_f1', float('nan')):.4f}  "
        f"NLL {m.get('nll', float('nan')):.4f}  ECE {m.get('ece', float('nan')):.4f}  "
        f"train {train.get('samples_per_second', float('nan')):.1f} rows/s"
        + (f" (steady {train['steady_samples_per_second']:.1f})" if train.get("steady_samples_per_second") else "")
        + f"  {entry.get('seconds', float('nan')):.0f} s"
    )


def ensemble_said(members: list[int], n: int) -> str:
    """The teacher of a generation under ``teacher.ensemble`` ``n``, as the console and report.md
    name it: the generations ``members`` whose softmaxes it averages."""
    fewer = f"; {len(members)} promoted so far" if len(members) < n else ""
    return f"teacher = mean softmax of generation(s) {', '.join(map(str, members))} (teacher.ensemble {n}{fewer})"


# Continual-learning figures a generation may carry: (column heading, cell format).
CONTINUAL = {
    "flip_rate": ("flip rate", _pct),
    "fix_rate": ("fix rate", _pct),
    "retention_accuracy": ("retention acc", lambda x: _num(x, ".4f")),
    "retention_rows": ("retention rows", lambda x: _num(None if x is None else int(x), "d")),
}


def table_markdown(generations: list[dict[str, Any]]) -> str:
    """Holdout metrics per generation; flip-rate and retention columns when a generation has them."""
    continual = [k for k in CONTINUAL if any(k in (e.get("continual") or {}) for e in generations)]
    head = "| gen | kind | rows | accuracy | macro-F1 | NLL | ECE |"
    rule = "|---:|---|---:|---:|---:|---:|---:|"
    for k in continual:
        head += f" {CONTINUAL[k][0]} |"
        rule += "---:|"
    head += " train rows/s | steady rows/s | seconds |\n"
    rule += "---:|---:|---:|\n"
    lines = []
    for e in generations:
        m = e.get("metrics") or {}
        t = e.get("train") or {}
        cells = [str(e["index"]), _kind(e), str(e.get("rows", 0)), _num(m.get("accuracy"), ".4f"),
                 _num(m.get("macro_f1"), ".4f"), _num(m.get("nll"), ".4f"), _num(m.get("ece"), ".4f")]
        c = e.get("continual") or {}
        cells += [CONTINUAL[k][1](c.get(k)) for k in continual]
        cells += [_num(t.get("samples_per_second"), ".1f"), _num(t.get("steady_samples_per_second"), ".1f"),
                  _num(e.get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return head + rule + "\n".join(lines) + "\n"


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
        cells += [_num(int(block_rows) if block_rows is not None else None, "d"),
                 _num(t.get("accuracy"), ".4f"), _num(t.get("nll"), ".4f"), _pct(t.get("kept")),
                 _pct(t.get("pushed")), _pct(t.get("floored")), _num(t.get("target_entropy"), ".3f")]
        if suspects:
            sp = e.get("suspects")
            cells.append(f"{sp['rows']} ({_pct(sp['share'])}, {sp['policy']})" if sp else DASH)
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
        cells = [str(e["index"]), _num(c.get("temperature"), ".3f"), _num(c.get("ece_before"), ".4f"),
                 _num(c.get("ece_after"), ".4f"), _num(c.get("nll_before"), ".4f"), _num(c.get("nll_after"), ".4f")]
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
        cells = [str(e["index"]), _num(w.get("lambda"), "g"), _num(w.get("anchor_generation"), "d"),
                 _num(w.get("params"), ",d"), _num(w.get("penalty_first"), ".3g"), _num(w.get("penalty_last"), ".3g"),
                 _num(w.get("penalty_mean"), ".3g"), _pct(w.get("share_last")), _num(f.get("rows"), "d"),
                 _num(f["bytes"] / 2**20 if "bytes" in f else None, ".1f"), _num(f.get("seconds"), ".1f")]
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
        cells = [str(e["index"]), m.get("selection", "–"), _num(m.get("rows"), "d"), _num(m.get("classes"), "d"),
                 _num(m.get("per_class"), "d"), _num(m.get("candidates"), "d"), _num(m.get("mean_distance"), ".4f"),
                 _num(b.get("rows"), "d"), _num(b.get("steps"), "d"), _num(b.get("learning_rate"), "g")]
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
    lines = ["| " + " | ".join([str(r["generation"]), *(_num(r[t], ".4f") for t in drift["tasks"])]) + " |"
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
            before = (f"{_num(h['old_accuracy_before'], '.4f')} (gen {record['before']})"
                      if "old_accuracy_before" in h else DASH)
            forgetting = h.get("forgetting")
            lines.append("| " + " | ".join([
                str(e["index"]), _data_set(name), f"{h['old_rows']} / {h['new_rows']}", _num(h.get("old_accuracy"), ".4f"),
                before, DASH if forgetting is None else f"{100 * forgetting:+.1f} points",
                _num(h.get("new_accuracy"), ".4f"), _num(h.get("accuracy"), ".4f")]) + " |")
            classes = h.get("classes") or {}
            recalls.append("| " + " | ".join([str(e["index"]), _data_set(name), *(
                _num((classes.get(n) or {}).get("recall"), ".4f") for n in label_names)]) + " |")
    return head + "\n".join(lines) + "\n\nRecall per class (– : no rows of the class there):\n\n" + recall_head + \
        "\n".join(recalls) + "\n"


OPTIONAL_FIELDS = ("extended", "settings", "promoted", "ensemble", "teacher_on_block", "suspects", "continual",
                   "validation", "calibration", "own_holdout", "own_holdout_rows", "drift", "old_new", "ewc", "fisher",
                   "memory")


def render_report(manifest: dict[str, Any]) -> tuple[str, str]:
    """(report.md, report.json) text for a run manifest."""
    gens = finished(manifest)
    cfg = manifest["config"]
    final = final_entry(manifest)
    ensemble = (cfg.get("teacher") or {}).get("ensemble", 1)  # absent in run folders from before it
    md = [f"# incr-ray run `{manifest['name']}`", ""]
    md.append(
        f"k={cfg['method']['k']} blocks, threshold p={cfg['method']['threshold']}, "
        f"floor={cfg['method']['floor']}, τ={cfg['method']['temperature']}, α={cfg['method']['alpha']}, "
        f"student.init={cfg['student']['init']}, base model `{cfg['model']['base']}`, "
        f"DeepSpeed ZeRO-{cfg['deepspeed']['stage']}, {cfg['cluster']['workers']} worker(s)."
        + (f" The teacher of each generation is the mean softmax of the last {ensemble} promoted generations "
           "before it (teacher.ensemble)." if ensemble > 1 else "")
    )
    md.append(f"Labels: {', '.join(manifest['label_names'])}. Holdout rows: {manifest['data']['holdout_size']}.")
    md += ["", "## Holdout metrics per generation", "", table_markdown(gens)]
    if any(e.get("continual") for e in gens):
        md += ["Flip rate: share of holdout rows the generation's teacher got right and it gets wrong "
               "(fix rate: the reverse). Retention: accuracy on a sample of earlier blocks.", ""]

    extensions = {}
    for e in gens:
        change = extension_change(gens, e)
        if change is None:
            continue
        extensions[e["index"]] = change
        own = ", ".join(f"`{k}={v}`" for k, v in (e.get("settings") or {}).items())
        trained_with = f" (trained with {own})" if own else ""
        md.append(f"Generation {e['index']} extension{trained_with}: holdout accuracy {change['accuracy_before']:.4f} "
                  f"(generation {change['previous_generation']}) → {change['accuracy_after']:.4f} "
                  f"({change['delta_points']:+.1f} points).")
        if change["worse"]:
            md.append(f"**Warning:** extending made holdout accuracy worse by {-change['delta_points']:.1f} points "
                      f"than generation {change['previous_generation']}.")
        md.append("")

    if final:
        later = [e["index"] for e in gens if e["index"] > final["index"] and e.get("promoted") is False]
        accuracy = (final.get("metrics") or {}).get("accuracy")
        md.append(f"Final model: `{final.get('model')}` (generation {final['index']}), "
                  f"holdout accuracy {_num(accuracy, '.4f')}"
                  + (f"; generation(s) {', '.join(map(str, later))} not promoted." if later else "."))
        md.append("")

    teacher = teacher_table_markdown(gens)
    if teacher:
        md += ["## What the teacher and the target rule did", "",
               "Each generation's teacher on the new block's own rows (replay rows left "
               "out), before the student trained on it: its accuracy and NLL (at τ = 1), and which "
               "branch of the target rule each row took — kept (q_c ≥ p: t = q), pushed (t_c raised to p), "
               "floored (q_c < f: one-hot) — with the targets' mean entropy. Suspected label errors: rows "
               "whose teacher gives their label less than method.suspect_below (`incr-ray suspects` lists "
               "them), and what the student trained on for them (method.suspects)."
               + (" With teacher.ensemble the teacher is the mean of the softmaxes of the generations named, "
                  "each padded with zeros for classes it never saw." if ensemble > 1 else ""), "", teacher]
    calibration = calibration_table_markdown(gens)
    if calibration:
        md += ["## Calibration (temperature scaling)", "", calibration]
    ewc = ewc_table_markdown(gens)
    if ewc:
        md += ["## Elastic weight consolidation", "",
               "The penalty λ/2·Σ F(θ − θ*)² against the teacher's diagonal Fisher (method.ewc), and the "
               "Fisher each generation stored for its student (gen_NNN/fisher.safetensors).", "", ewc]
    memory = memory_table_markdown(gens)
    if memory:
        md += ["## Memory and balanced fine-tuning", "",
               "The old classes' rows each student replayed (replay.per_class, gen_NNN/memory.parquet), chosen "
               "at random or by herding on the teacher's features (mean distance: of each class's memory mean "
               "to its class mean), and the balanced pass after its main training (student.balanced_epochs).",
               "", memory]
    drift = drift_matrix(gens)
    if drift:
        md += ["## Drift: accuracy on each data set's own holdout", "",
               "Extensions run with `--holdout-fraction` held part of their new data out; every later "
               "generation is scored on it.", "", drift_markdown(drift)]
    old_new = old_new_markdown(gens, manifest["label_names"])
    if old_new:
        md += ["## Old and new classes", "",
               "From the extension that added labels on (`--allow-new-labels`), each generation on the run's holdout "
               "and on each extension's own: accuracy on the classes known before that extension (old), on those it "
               "added (new) and on all; the old classes' accuracy by the generation's teacher on the same rows "
               "(before), and the forgetting: before − after, positive when the old classes lost accuracy. A row of "
               "a class a model does not know counts as wrong for it.", "", old_new]
    md.append("![metrics per generation](generations.png)")

    def entry_json(g: dict[str, Any]) -> dict[str, Any]:
        out = {"index": g["index"], "rows": g.get("rows"), "metrics": g.get("metrics"),
               "train": g.get("train"), "seconds": g.get("seconds"), "model": g.get("model")}
        out.update({k: g[k] for k in OPTIONAL_FIELDS if g.get(k) is not None})
        if g["index"] in extensions:
            out["extension"] = extensions[g["index"]]
        return out

    report = {
        "name": manifest["name"],
        "label_names": manifest["label_names"],
        "generations": [entry_json(g) for g in gens],
        "final": {"generation": final["index"], "metrics": final.get("metrics"), "model": final.get("model")}
        if final else None,
        **({"drift": drift} if drift else {}),
    }
    return "\n".join(md) + "\n", json.dumps(report, indent=2)


def plot_png(manifest: dict[str, Any]) -> bytes:
    """PNG bytes: the four holdout metrics against generation."""
    # pyplot is imported here, after choosing the file-only Agg backend, so that importing this
    # module never touches a display or pays for matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = finished(manifest)
    xs = [g["index"] for g in gens]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, key in zip(axes, METRICS):
        ax.plot(xs, [(g.get("metrics") or {}).get(key, float("nan")) for g in gens], marker="o", label="holdout")
        if key == "accuracy":
            # The teacher of generation g on block g, before M_g trained on it; earlier blocks, when measured.
            for label, pick, style in (
                ("teacher on new block", lambda g: (g.get("teacher_on_block") or {}).get("accuracy"), "s--"),
                ("retention (earlier blocks)", lambda g: (g.get("continual") or {}).get("retention_accuracy"), "^:"),
            ):
                points = [(g["index"], pick(g)) for g in gens if pick(g) is not None]
                if points:
                    ax.plot(*zip(*points), style, label=label)
            if len(ax.get_lines()) > 1:
                ax.legend(fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("generation")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"incr-ray run {manifest['name']}: holdout metrics")
    return figure_png(fig)


def figure_png(fig) -> bytes:
    """A matplotlib figure as PNG bytes (laid out tight, 100 dpi), closed after."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
