"""The human-readable end of a run: the per-generation table, report.md/json and the metrics plot."""

from __future__ import annotations

import io
import json
from typing import Any

METRICS = ("accuracy", "macro_f1", "nll", "ece")


def summary_line(entry: dict[str, Any], k: int) -> str:
    m = entry.get("metrics") or {}
    train = entry.get("train") or {}
    return (
        f"gen {entry['index']}/{k - 1}  rows {entry.get('rows', 0):>6}  "
        f"acc {m.get('accuracy', float('nan')):.4f}  macro-F1 {m.get('macro_f1', float('nan')):.4f}  "
        f"NLL {m.get('nll', float('nan')):.4f}  ECE {m.get('ece', float('nan')):.4f}  "
        f"train {train.get('samples_per_second', float('nan')):.1f} rows/s  "
        f"{entry.get('seconds', float('nan')):.0f} s"
    )


def table_markdown(generations: list[dict[str, Any]]) -> str:
    head = "| gen | kind | rows | accuracy | macro-F1 | NLL | ECE | train rows/s | seconds |\n"
    head += "|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for e in generations:
        m = e.get("metrics") or {}
        t = e.get("train") or {}
        kind = "one-hot" if e["index"] == 0 else ("extend" if e.get("extended") else "soft targets")
        lines.append(
            f"| {e['index']} | {kind} | {e.get('rows', 0)} | {m.get('accuracy', float('nan')):.4f} | "
            f"{m.get('macro_f1', float('nan')):.4f} | {m.get('nll', float('nan')):.4f} | "
            f"{m.get('ece', float('nan')):.4f} | {t.get('samples_per_second', float('nan')):.1f} | "
            f"{e.get('seconds', float('nan')):.0f} |"
        )
    return head + "\n".join(lines) + "\n"


def render_report(manifest: dict[str, Any]) -> tuple[str, str]:
    """(report.md, report.json) text for a run manifest."""
    gens = [g for g in manifest["generations"] if g.get("status") == "finished"]
    cfg = manifest["config"]
    final = gens[-1] if gens else None
    md = [f"# incr-ray run `{manifest['name']}`", ""]
    md.append(
        f"k={cfg['method']['k']} blocks, threshold p={cfg['method']['threshold']}, "
        f"floor={cfg['method']['floor']}, τ={cfg['method']['temperature']}, α={cfg['method']['alpha']}, "
        f"student.init={cfg['student']['init']}, base model `{cfg['model']['base']}`, "
        f"DeepSpeed ZeRO-{cfg['deepspeed']['stage']}, {cfg['cluster']['workers']} worker(s)."
    )
    md.append(f"Labels: {', '.join(manifest['label_names'])}. Holdout rows: {manifest['data']['holdout_size']}.")
    md += ["", "## Holdout metrics per generation", "", table_markdown(gens)]
    if final:
        md.append(f"Final model: `{final['model']}` (generation {final['index']}), "
                  f"holdout accuracy {final['metrics']['accuracy']:.4f}.")
    md.append("")
    md.append("![metrics per generation](generations.png)")
    report = {
        "name": manifest["name"],
        "label_names": manifest["label_names"],
        "generations": [
            {"index": g["index"], "rows": g.get("rows"), "metrics": g.get("metrics"),
             "train": g.get("train"), "seconds": g.get("seconds"), "model": g.get("model")}
            for g in gens
        ],
        "final": {"generation": final["index"], "metrics": final["metrics"], "model": final["model"]} if final else None,
    }
    return "\n".join(md) + "\n", json.dumps(report, indent=2)


def plot_png(manifest: dict[str, Any]) -> bytes:
    """PNG bytes: the four holdout metrics against generation."""
    # pyplot is imported here, after choosing the file-only Agg backend, so that importing this
    # module never touches a display or pays for matplotlib.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [g for g in manifest["generations"] if g.get("status") == "finished"]
    xs = [g["index"] for g in gens]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, key in zip(axes, METRICS):
        ax.plot(xs, [g["metrics"][key] for g in gens], marker="o")
        ax.set_title(key)
        ax.set_xlabel("generation")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    fig.suptitle(f"incr-ray run {manifest['name']}: holdout metrics")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
