"""The comparison's answer, from its trials' results: per variant, each metric minus the config's own
run on the same seed, then the mean of those differences with its 95% interval
(:mod:`incr_ray.method.paired`). An interval that contains 0 is "inside the seed noise", and the
report says roughly how many seeds would resolve it at the observed spread. Pure: no Ray.

A trial's result (what :mod:`.trials` reads from its run folder) is a dict with ``status``
(``finished`` | ``failed``), ``error`` (its one line), ``metrics`` (the final model's holdout
``accuracy``, ``macro_f1``, ``nll``, ``ece``), ``cost_seconds`` (the run's generations, end to
end), ``holdout_size`` and ``run_dir``.
"""

from __future__ import annotations

from typing import Any

from ..method.paired import fmt_difference, mean_ci, paired_difference, seeds_to_resolve
from .plan import CONFIG_VARIANT, ComparePlan

METRICS = ("accuracy", "macro_f1", "nll", "ece", "cost_seconds")
NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "nll": "NLL", "ece": "ECE", "cost_seconds": "cost s"}
LOWER_IS_BETTER = {"nll", "ece", "cost_seconds"}
POINTS = {"accuracy", "macro_f1"}  # shown in points (× 100)


def _value(result: dict[str, Any], metric: str) -> float | None:
    if result.get("status") != "finished":
        return None
    if metric == "cost_seconds":
        return result.get("cost_seconds")
    return (result.get("metrics") or {}).get(metric)


def summarize(plan: ComparePlan, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """compare.json's content: the plan, every trial's result, per-variant means and the paired
    differences against the config's own run."""
    trials = []
    for t in plan.trials:
        r = results.get(t.name) or {"status": "failed", "error": t.error or "did not run"}
        trials.append({"variant": t.variant, "seed": t.seed, "name": t.name, **r})
    by = {(t["variant"], t["seed"]): t for t in trials}
    means: dict[str, dict[str, Any]] = {}
    diffs: dict[str, dict[str, Any]] = {}
    unpaired: list[str] = []
    for v in plan.variants:
        values = {m: [x for s in plan.seeds if (x := _value(by[(v.name, s)], m)) is not None] for m in METRICS}
        means[v.name] = {m: mean_ci(vals) if vals else None for m, vals in values.items()}
        if v.name == CONFIG_VARIANT:
            continue
        diffs[v.name] = {}
        for m in METRICS:
            pairs = [(a, b) for s in plan.seeds
                     if (a := _value(by[(v.name, s)], m)) is not None
                     and (b := _value(by[(CONFIG_VARIANT, s)], m)) is not None]
            if not pairs:
                diffs[v.name][m] = None
                continue
            d = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
            d["seeds_to_resolve"] = seeds_to_resolve(d) if d["noise"] else None
            diffs[v.name][m] = d
        for s in plan.seeds:
            a, b = by[(v.name, s)], by[(CONFIG_VARIANT, s)]
            if a.get("status") == b.get("status") == "finished" and a.get("holdout_size") != b.get("holdout_size"):
                unpaired.append(f"{v.name} seed {s}: holdout of {a.get('holdout_size')} rows against "
                                f"{b.get('holdout_size')}")
    return {"folder": plan.folder, "seeds": plan.seeds, "config": plan.base.to_dict(),
            "variants": [{"name": v.name, "overrides": list(v.overrides), "error": v.error} for v in plan.variants],
            "trials": trials, "means": means, "differences": diffs, "unpaired": unpaired}


def _fmt_mean(ci: dict[str, Any] | None, metric: str) -> str:
    if ci is None:
        return "–"
    if metric == "cost_seconds":
        return f"{ci['mean']:.0f} ± {ci['std']:.0f}"
    return f"{ci['mean']:.4f} ± {ci['std']:.4f}"


def _fmt_diff(d: dict[str, Any] | None, metric: str) -> str:
    if d is None:
        return "–"
    scale, digits = (100.0, 2) if metric in POINTS else ((1.0, 0) if metric == "cost_seconds" else (1.0, 4))
    text = fmt_difference(d, scale, digits)
    if d.get("noise") and d.get("seeds_to_resolve"):
        text += f" (≈{d['seeds_to_resolve']} seeds would resolve it)"
    return text


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def render_markdown(summary: dict[str, Any]) -> str:
    seeds = summary["seeds"]
    done = [t for t in summary["trials"] if t.get("status") == "finished"]
    out = [f"# incr-ray compare: {summary['folder']}", "",
           f"{len(summary['variants'])} variant(s) × {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
           f"{len(done)} of {len(summary['trials'])} trials finished. Holdout metrics of each run's final model, "
           "mean ± sample std over the seeds that finished.", ""]
    out.append(_table(["variant", *[NAMES[m] for m in METRICS]],
                      [[v["name"], *[_fmt_mean(summary["means"][v["name"]][m], m) for m in METRICS]]
                       for v in summary["variants"]]))
    if summary["differences"]:
        out += ["", f"Paired differences, variant − {CONFIG_VARIANT} on the same seed (same split and holdout), "
                "mean with its 95% interval (Student t over the seeds both finished); accuracy and macro-F1 in "
                "points. An interval that contains 0 is inside the seed noise; the seeds that would resolve it "
                "assume the observed mean and spread.", ""]
        out.append(_table(["variant − config", *[NAMES[m] for m in METRICS]],
                          [[name, *[_fmt_diff(d.get(m), m) for m in METRICS]]
                           for name, d in summary["differences"].items()]))
    failed = [t for t in summary["trials"] if t.get("status") != "finished"]
    if failed:
        out += ["", "Trials that did not finish:", ""]
        out.append(_table(["variant", "seed", "error"],
                          [[t["variant"], t["seed"], (t.get("error") or "").replace("|", "\\|")] for t in failed]))
    if summary["unpaired"]:
        out += ["", "Not paired (a variant changed the holdout, so its differences mix data and method): "
                + "; ".join(summary["unpaired"])]
    out += ["", "Each trial is a run folder: " + ", ".join(f"`{t['name']}`" for t in summary["trials"][:4])
            + (", …" if len(summary["trials"]) > 4 else "") + f" in {summary['folder']} (`incr-ray status --run`, "
            "`evaluate`, `predict` work on each)."]
    return "\n".join(out) + "\n"


def plot_png(summary: dict[str, Any]) -> bytes | None:
    """Each variant's difference from the config (accuracy in points, NLL, ECE) with its interval."""
    diffs = summary["differences"]
    if not diffs:
        return None
    import matplotlib

    from ..run.report import figure_png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ("accuracy", "nll", "ece")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 0.6 * len(diffs) + 1.8))
    names = list(diffs)
    for ax, m in zip(axes, metrics):
        scale = 100.0 if m in POINTS else 1.0
        for i, name in enumerate(names):
            d = diffs[name].get(m)
            if d is None:
                continue
            lo = d["lo"] if d["lo"] is not None else d["mean"]
            hi = d["hi"] if d["hi"] is not None else d["mean"]
            ax.errorbar(scale * d["mean"], i, xerr=[[scale * (d["mean"] - lo)], [scale * (hi - d["mean"])]],
                        fmt="o", capsize=4, color="C0" if d.get("noise") else "C3")
        ax.axvline(0.0, color="grey", lw=1)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.set_title(f"{NAMES[m]}{' (points)' if m in POINTS else ''}: variant − config")
    return figure_png(fig)
