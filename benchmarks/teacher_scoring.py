"""Teacher scoring in steady state: the Ray Data actor pool against the same work in a plain loop.

    python benchmarks/teacher_scoring.py --label after                 # 9 min on 2 busy cores
    mkdir /tmp/before && git archive f88817e | tar -x -C /tmp/before   # the code to compare with
    cp benchmarks/teacher_scoring.py /tmp/before/benchmarks/ && cd /tmp/before
    /work/main/.venv/bin/python benchmarks/teacher_scoring.py --label before --batch 128 --rows 2048 \
        --out /work/main/benchmarks/results                            # 4.5 min

Each run measures one version of ``incr_ray``, in the driver and in every Ray worker: the one
beside the script (Ray's workers import from the driver's folder first, so an older version runs
from a copy of its tree, as above; ``--package-root`` names another and the run checks where the
workers import from) and adds its figures under ``--label`` to
``benchmarks/results/teacher_scoring.{json,md}``; the table shows every label kept there. Within a
run all paths score the same rows with the same model (MiniLM, a random head, Rotten Tomatoes,
max_length 48) on 2 threads, in interleaved rounds, so each ratio compares measurements taken
seconds apart on a machine whose other load moves (this one is shared):

- ``plain``: the scorer's own class (``TargetScorer``) called in this process on batches of
  ``teacher.batch_size``: the work an actor does, without Ray;
- ``naive``: the plain loop ``throughput.py`` compared with until 2026-12-06 (batches of 128 padded
  to their longest row, in row order): one fixed reference across versions;
- ``ray_1x2`` / ``ray_2x1``: ``score_block`` with 1 actor × 2 CPUs (the CPU default) and 2 × 1.

Steady state: each plain loop times every batch after a warm-up batch; a Ray path counts the rows
that reach the driver after the first output block and divides by the time from that block to the
last (actor start-up, model load and the first batch left out). The rows reach ``score_block`` as
a block read from many files does: blocks of one batch each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import harness  # noqa: F401  (environment before ray)
from harness import ROOT, machine, markdown_table, write_results

THREADS = 2
MAX_LENGTH = 48
NAIVE_BATCH = 128
PATHS = {
    "plain": "TargetScorer in this process (no Ray)",
    "naive": f"plain HF loop, batches of {NAIVE_BATCH} padded to the longest row",
    "ray_1x2": "Ray Data pool, 1 actor × 2 CPUs",
    "ray_2x1": "Ray Data pool, 2 actors × 1 CPU",
}


def steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Rows per second after the first of ``(seconds, rows)`` arrivals: the rows of every later
    arrival over the time from the first to the last; None with fewer than two arrivals."""
    if len(arrivals) < 2:
        return None
    (t0, _), (t1, _) = arrivals[0], arrivals[-1]
    return sum(n for _, n in arrivals[1:]) / (t1 - t0) if t1 > t0 else None


def plain_rate(score, batches: list[dict[str, np.ndarray]]) -> float:
    """Steady-state rows/s of ``score(batch)`` over ``batches``, the first one a warm-up."""
    score(batches[0])
    arrivals = [(time.perf_counter(), 0)]
    for b in batches[1:]:
        score(b)
        arrivals.append((time.perf_counter(), len(b["label"])))
    return steady_rate(arrivals)


def naive_scorer(model_dir: str):
    """The loop throughput.py ran as its plain reference: padded to each batch's longest row."""
    import torch

    from incr_ray.method.targets import soft_targets, softmax
    from incr_ray.modeling import load_classifier, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer=tok).eval()

    def score(batch):
        enc = tok([str(t) for t in batch["text"]], padding=True, truncation=True, max_length=MAX_LENGTH,
                  return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits.float().numpy()
        return soft_targets(softmax(logits), batch["label"], threshold=0.9)

    return score


def ray_run(ds, model_dir: str, cfg) -> dict[str, Any]:
    """One ``score_block`` call: whole-call seconds and the steady rate at the driver."""
    from incr_ray.generation.teacher import score_block

    started = time.perf_counter()
    arrivals, rows = [], 0
    for block in score_block(ds, model_dir, cfg, on_gpu=False).iter_batches(batch_size=None, batch_format="pyarrow"):
        arrivals.append((time.perf_counter(), block.num_rows))
        rows += block.num_rows
    seconds = time.perf_counter() - started
    assert rows == ds.count(), "the actor pool lost or duplicated rows"
    return {"seconds": seconds, "rows_per_s": rows / seconds, "steady_rows_per_s": steady_rate(arrivals),
            "output_blocks": len(arrivals)}


def measure(workdir: Path, rows: int, batch: int | None, rounds: int) -> dict[str, Any]:
    from incr_ray.generation.teacher import TargetScorer
    from incr_ray.resolve import probe_cluster, resolve
    from throughput import classifier_folder, config, training_rows

    ds, label_names = training_rows(workdir, rows)
    model_dir = classifier_folder(workdir, label_names)
    from incr_ray.config import TeacherSection

    changes = {"teacher.batch_size": batch or TeacherSection().batch_size}  # throughput's config sets 128
    cfg = config(workdir, "teacher", rows, **changes)
    batch_size = cfg.teacher.batch_size
    ds = ds.repartition(target_num_rows_per_block=batch_size, strict=True).materialize()
    table = ds.to_pandas()
    cols = ["row_id", "text", "label"]
    batches = [{c: table[c].to_numpy()[i:i + batch_size] for c in cols} for i in range(0, len(table), batch_size)]
    naive_batches = [{c: table[c].to_numpy()[i:i + NAIVE_BATCH] for c in cols} for i in range(0, len(table), NAIVE_BATCH)]
    scorer = TargetScorer(model_dir, resolve(cfg, probe_cluster()), on_gpu=False)
    naive = naive_scorer(model_dir)
    ray_cfgs = {label: resolve(config(workdir, "teacher", rows, **changes, **{"teacher.pool_size": pool,
                                                                             "teacher.cpus_per_actor": cpus}),
                               probe_cluster())
                for label, pool, cpus in (("ray_1x2", 1, THREADS), ("ray_2x1", 2, 1))}
    out: dict[str, Any] = {label: [] for label in PATHS}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        out["plain"].append({"steady_rows_per_s": plain_rate(scorer, batches)})
        out["naive"].append({"steady_rows_per_s": plain_rate(naive, naive_batches)})
        for label, rcfg in ray_cfgs.items():
            out[label].append(ray_run(ds, model_dir, rcfg))
    summary = {label: {"steady_rows_per_s": float(np.median([x["steady_rows_per_s"] for x in xs])), "rounds": xs}
               for label, xs in out.items()}
    for label, s in summary.items():
        s["x_plain"] = s["steady_rows_per_s"] / summary["plain"]["steady_rows_per_s"]
        s["x_naive"] = s["steady_rows_per_s"] / summary["naive"]["steady_rows_per_s"]
    return {"rows": len(table), "batch_size": batch_size, "input_blocks": ds.num_blocks(),
            "forward_tokens": getattr(cfg.teacher, "forward_tokens", None), "paths": summary}


def render(runs: dict[str, Any]) -> str:
    lines = [f"MiniLM (22.7M parameters), Rotten Tomatoes, max_length {MAX_LENGTH}, {THREADS} threads per side; "
             "steady state (warm-up and start-up left out), median of the rounds.", ""]
    rows = []
    for label, r in runs.items():
        for path, name in PATHS.items():
            p = r["paths"][path]
            rows.append([label, r["date"], name, r["batch_size"], f"{p['steady_rows_per_s']:.0f}",
                         f"{p['x_plain']:.2f}", f"{p['x_naive']:.2f}"])
    lines += [markdown_table(["code", "measured", "path", "batch", "rows/s", "× plain (same code)", "× naive loop"], rows), ""]
    for label, r in runs.items():
        lines.append(f"- {label}: {r['package']} — {r['rows']} rows in {r['input_blocks']} input blocks, "
                     f"{r['rounds']} rounds, {r['wall_seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", required=True, help="the name these figures are kept under (before, after)")
    p.add_argument("--package-root", type=Path, help="a folder holding the incr_ray to measure (default: this clone's)")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--batch", type=int, help="teacher.batch_size (default: the config's default)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "benchmarks" / "teacher_scoring")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    a = p.parse_args(argv)
    import ray
    import torch

    package = str((a.package_root or ROOT).resolve())
    sys.path.insert(0, package)
    # The workers import incr_ray from the same folder: PYTHONPATH comes before the editable install.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {
        "PYTHONPATH": os.pathsep.join([package, str(Path(__file__).parent)]), "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error"}})
    harness.start_local_ray()  # Ray started above: this only keeps Ray Data's progress lines off the console
    import incr_ray

    assert str(Path(incr_ray.__file__).resolve()).startswith(package), incr_ray.__file__
    where = ray.get(ray.remote(lambda: __import__("incr_ray").__file__).remote())
    assert str(Path(where).resolve()).startswith(package), f"the workers import {where}"
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    r = measure(a.workdir.resolve(), a.rows, a.batch, a.rounds)
    r.update(package=package, rounds=a.rounds, wall_seconds=time.perf_counter() - started, machine=machine(),
             date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    path = a.out / "teacher_scoring.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else {}
    runs[a.label] = r
    text = render(runs)
    print(text)
    write_results("teacher_scoring", {"runs": runs}, text, None, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
