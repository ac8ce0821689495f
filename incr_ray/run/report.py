"""The human-readable end of a run: the generation table, report.md/json and the metrics plot (the
tables of what each lever did are in :mod:`incr_ray.run.report_tables`).

Everything here reads the manifest as ``run.json`` holds it (a dict, absent fields left out), and
renders a field a generation entry may lack — ``teacher_on_block``, ``promoted``, ``continual``,
``calibration`` — only where it is present, so run folders written by older versions still report.
"""

from __future__ import annotations

import io
import json
from typing import Any

from .report_tables import (calibration_table_markdown, cell, drift_markdown, drift_matrix, ewc_table_markdown,
                            memory_table_markdown, old_new_markdown, pct_cell, teacher_table_markdown)

METRICS = ("accuracy", "macro_f1", "nll", "ece")
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
    "flip_rate": ("flip rate", pct_cell),
    "fix_rate": ("fix rate", pct_cell),
    "retention_accuracy": ("retention acc", lambda x: cell(x, ".4f")),
    "retention_rows": ("retention rows", lambda x: cell(None if x is None else int(x), "d")),
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
        cells = [str(e["index"]), _kind(e), str(e.get("rows", 0)), cell(m.get("accuracy"), ".4f"),
                 cell(m.get("macro_f1"), ".4f"), cell(m.get("nll"), ".4f"), cell(m.get("ece"), ".4f")]
        c = e.get("continual") or {}
        cells += [CONTINUAL[k][1](c.get(k)) for k in continual]
        cells += [cell(t.get("samples_per_second"), ".1f"), cell(t.get("steady_samples_per_second"), ".1f"),
                  cell(e.get("seconds"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return head + rule + "\n".join(lines) + "\n"


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
                  f"holdout accuracy {cell(accuracy, '.4f')}"
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
