"""Overhead and scaling: the Ray pipeline against plain single-process Hugging Face, as ratios.

    python benchmarks/throughput.py           # 43 min on 2 cores on 2026-12-01 (default sizes below)

All parts run in one process, one after another, on the same machine and local Ray, so every
ratio compares two measurements taken minutes apart under the same conditions:

1. teacher scoring: rows/s of ``generation.teacher.score_block`` (Ray Data actor pool, 1 actor × 2 threads,
   and 2 actors × 1 thread) vs a plain loop (tokenizer + model + softmax + soft targets, 2 torch
   threads) over the same rows, model and batch size; for the whole call (start-up included) and
   at the margin (between half and all of the rows, which cancels start-up); the steady state with
   a timed warm-up, and before/after the length-sorted scorer, is ``benchmarks/teacher_scoring.py``'s;
2. student training: samples/s of ``generation.student.fit_student`` with the defaults (Ray Train +
   DeepSpeed, ``deepspeed.stage`` and ``cluster.cpus_per_worker`` auto: ZeRO-0, 1 worker × 2 threads
   here), with ZeRO-2, with 1 thread (the old default), and with 2 workers × 1 thread, vs a plain
   ``transformers.Trainer`` in this process (2 threads, no DeepSpeed) on the same rows, steps,
   batch size and collate function. Reported both inside the training loop (``trainer.train``)
   and for the whole call (start-up included);
3. training order (in memory vs Ray Data's sort), then end to end and growth: wall time of a k=4
   incremental run (``run.loop.run_generations``) and of one full fine-tune at n, 2n and 4n rows, a
   straight line fitted to each (fixed seconds + seconds per row), the per-generation fixed cost
   taken apart (fit start-up, scoring, evaluation), a cProfile of the driver during the largest
   incremental run (where the rest goes), and a ``method.threshold: 1`` run at n rows (no
   teacher scoring);
4. memory: model-state memory per worker, ZeRO-0 vs ZeRO-3, 2 workers, the same random-weight
   Llama-style model as ``benchmarks/zero_memory.py`` (that script's measurement);
5. achieved FLOP/s of student training (6 · parameters · tokens / in-loop seconds) against this
   machine's measured fp32 matmul peak (2 threads).

Default sizes: 2,000 rows scored, 640 rows trained, growth at 750, 1,500 and 3,000 rows, one pass at
batch 32 and ``student.min_steps: 0`` (so that the cost follows the rows).
Results go to ``benchmarks/results/throughput.{json,md,png}``.
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

import numpy as np

import harness  # noqa: F401  (environment before ray)
from harness import (ROOT, figure_png, machine, markdown_table, run_full_fine_tune, run_k_blocks, start_local_ray,
                     write_results)

THREADS = 2  # this box's cores; every side of every comparison gets the same
MAX_LENGTH = 48
BATCH = 32
TEACHER_BATCH = 128
LR = 3e-4


def config(workdir: Path, name: str, rows: int, **changes: Any):
    from incr_ray.config import config_from_dict

    raw = {
        "run": {"name": name, "seed": 0},
        "storage": {"path": str(workdir)},
        "data": {"source": "rotten_tomatoes", "max_rows": rows, "eval_fraction": 0.1},
        "model": {"base": "minilm", "max_length": MAX_LENGTH},
        "method": {"k": 4, "threshold": 0.9},
        "student": {"init": "previous", "epochs": 1.0, "learning_rate": LR, "warmup_ratio": 0.1, "batch_size": BATCH,
                    "min_steps": 0},
        # deepspeed.stage, cluster.cpus_per_worker and teacher.cpus_per_actor stay `auto`, what a
        # user gets: ZeRO-0 and both cores for one worker (or actor) on this machine.
        "cluster": {"workers": 1},
        "teacher": {"batch_size": TEACHER_BATCH, "pool_size": 1},
    }
    return config_from_dict(raw, [f"{k}={v}" for k, v in changes.items()])


def training_rows(workdir: Path, rows: int):
    """(materialized Ray dataset of row_id/text/label, label names) from the project's own reader."""
    from incr_ray.data import split_data

    split = split_data(config(workdir, "rows", rows, **{"data.eval_fraction": 0.0}))
    return split.dataset.select_columns(["row_id", "text", "label"]).materialize(), split.label_names


def classifier_folder(workdir: Path, label_names: list[str]) -> str:
    """MiniLM with a (random) head for these labels, saved as a model folder: speed does not
    depend on the head's weights."""
    from incr_ray.modeling import load_classifier, load_tokenizer, minilm_dir

    dest = workdir / "minilm-classifier"
    tok = load_tokenizer(minilm_dir())
    load_classifier(minilm_dir(), label_names, tokenizer=tok).save_pretrained(dest)
    tok.save_pretrained(dest)
    return str(dest)


# ---------------------------------------------------------------------------------------------
# 1. Teacher scoring


def plain_scoring(model_dir: str, texts: list[str], labels: np.ndarray) -> float:
    """Seconds for a single-process loop: load, then tokenize/forward/softmax/targets per batch."""
    import torch

    from incr_ray.modeling import load_classifier, load_tokenizer
    from incr_ray.method.targets import soft_targets, softmax

    started = time.perf_counter()
    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer=tok).eval()
    for i in range(0, len(texts), TEACHER_BATCH):
        enc = tok(texts[i:i + TEACHER_BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                  return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits.float().numpy()
        soft_targets(softmax(logits), labels[i:i + TEACHER_BATCH], threshold=0.9)
    return time.perf_counter() - started


def bench_teacher(workdir: Path, ds) -> dict[str, Any]:
    """Each path scores the first half of the rows, then all of them. Whole-call rows/s include
    start-up (actor processes and imports for Ray, the model load for the plain loop); the
    marginal rate, Δrows/Δseconds between the two sizes, is the steady state with start-up
    cancelled out."""
    from incr_ray.generation.teacher import score_block
    from incr_ray.resolve import probe_cluster, resolve

    model_dir = str(workdir / "minilm-classifier")
    rows = ds.count()
    batch = ds.take_all()
    texts = [str(r["text"]) for r in batch]
    labels = np.array([int(r["label"]) for r in batch])
    half = rows // 2
    halves = {"all": ds, "half": ds.limit(half).materialize()}
    out: dict[str, Any] = {"rows": rows, "half_rows": half}
    for label, pool, cpus in (("plain", 0, THREADS), ("ray_1x2", 1, THREADS), ("ray_2x1", 2, 1)):
        seconds = {}
        for size in ("half", "all"):
            n = half if size == "half" else rows
            if label == "plain":
                seconds[size] = plain_scoring(model_dir, texts[:n], labels[:n])
                continue
            cfg = config(workdir, "teacher", rows, **{"teacher.pool_size": pool, "teacher.cpus_per_actor": cpus})
            cfg = resolve(cfg, probe_cluster())  # what open_run does for a run
            started = time.perf_counter()
            scored = score_block(halves[size], model_dir, cfg, on_gpu=False).materialize()
            seconds[size] = time.perf_counter() - started
            assert scored.count() == n, "the actor pool lost or duplicated rows"
        out[label] = {"seconds": seconds["all"], "half_seconds": seconds["half"],
                      "rows_per_s": rows / seconds["all"],
                      "marginal_rows_per_s": (rows - half) / (seconds["all"] - seconds["half"])}
    for label in ("ray_1x2", "ray_2x1"):
        out[label]["ratio_whole_call"] = out[label]["rows_per_s"] / out["plain"]["rows_per_s"]
        out[label]["ratio_marginal"] = out[label]["marginal_rows_per_s"] / out["plain"]["marginal_rows_per_s"]
    # With two actors the half-size run's blocks may all land on one actor, so the difference of
    # the two times is not a rate: no marginal figure for that row.
    out["ray_2x1"]["marginal_rows_per_s"] = out["ray_2x1"]["ratio_marginal"] = None
    return out


# ---------------------------------------------------------------------------------------------
# 2. Student training


def plain_training(model_dir: str, label_names: list[str], rows: list[dict], max_steps: int,
                   ray_ds=None, deepspeed: dict[str, Any] | None = None) -> dict[str, float]:
    """A plain HF ``Trainer`` in this process: the same collate, steps, batch size and lr; no Ray,
    no DeepSpeed, the model's own cross-entropy. With ``ray_ds`` its batches come from Ray Data's
    ``iter_torch_batches`` (collate included) the way a Ray Train worker's do, which isolates what
    that iteration costs. With ``deepspeed`` (a config dict) the Trainer runs DeepSpeed's engine;
    the process must then hold a torch process group (``deepspeed.init_distributed``)."""
    from transformers import Trainer, TrainingArguments

    from incr_ray.modeling import load_classifier, load_tokenizer
    from incr_ray.generation.trainer import make_collate

    started = time.perf_counter()
    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer=tok)
    collate = make_collate(tok, len(label_names), MAX_LENGTH)

    def data_collator(items: list[dict]) -> dict[str, Any]:
        batch = collate({"text": np.array([r["text"] for r in items], dtype=object),
                         "label": np.array([r["label"] for r in items])})
        batch.pop("targets")  # one-hot here: the model's own loss on labels is the same CE
        return batch

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="plain-hf-"), per_device_train_batch_size=BATCH,
        learning_rate=LR, warmup_steps=int(0.1 * max_steps), max_steps=max_steps, lr_scheduler_type="linear",
        logging_steps=max(1, max_steps // 10), save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, seed=0, deepspeed=deepspeed,
    )
    if ray_ds is None:
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=data_collator)
    else:
        from ray.train.huggingface.transformers import prepare_trainer

        def ray_collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
            out = collate(batch)
            out.pop("targets")
            return out

        batches = ray_ds.iter_torch_batches(batch_size=BATCH, collate_fn=ray_collate)
        trainer = prepare_trainer(Trainer(model=model, args=args, train_dataset=batches))
    loop_started = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - loop_started
    return {"train_seconds": loop, "call_seconds": time.perf_counter() - started,
            "samples": max_steps * BATCH, "samples_per_second": max_steps * BATCH / loop}


def collate_seconds(model_dir: str, label_names: list[str], rows: list[dict]) -> float:
    """Seconds the collate (tokenize + pad + targets) takes for every batch of ``rows``: the most
    that tokenizing ahead in Ray Data could take off the training loop."""
    from incr_ray.generation.trainer import make_collate
    from incr_ray.modeling import load_tokenizer

    collate = make_collate(load_tokenizer(model_dir), len(label_names), MAX_LENGTH)
    started = time.perf_counter()
    for i in range(0, len(rows), BATCH):
        part = rows[i:i + BATCH]
        collate({"text": np.array([r["text"] for r in part], dtype=object), "label": np.array([r["label"] for r in part])})
    return time.perf_counter() - started


# (label, workers, cpus_per_worker, deepspeed.stage) of the Ray Train paths; the first is the defaults'.
STUDENT_PATHS = (("ray_1x2", 1, "auto", "auto"), ("ray_1x2_zero2", 1, THREADS, 2), ("ray_1x1", 1, 1, "auto"),
                 ("ray_2x1", 2, 1, 2))
STUDENT_NAMES = {
    "plain": "plain HF Trainer, 2 threads",
    "plain_ray_data": "plain HF Trainer fed by Ray Data's iter_torch_batches",
    "ray_1x2": "Ray Train + DeepSpeed, defaults (ZeRO-0, 1 worker × 2 threads)",
    "ray_1x2_zero2": "… ZeRO-2 (the old CPU configs), 1 worker × 2 threads",
    "ray_1x1": "… ZeRO-0, 1 worker × 1 thread (the old cpus_per_worker)",
    "ray_2x1": "… ZeRO-2, 2 workers × 1 thread",
}


def ray_training(workdir: Path, ds, model_dir: str, label_names: list[str], label: str, workers: int,
                 cpus: int | str, stage: int | str) -> dict[str, Any]:
    """One ``fit_student`` (Ray Train + DeepSpeed, fed by Ray Data) on ``ds``, one pass, as a generation 0."""
    from incr_ray.generation.student import StudentRequest, fit_student
    from incr_ray.resolve import probe_cluster, resolve

    rows = ds.count()
    cfg = config(workdir, "student", rows, **{"cluster.workers": workers, "cluster.cpus_per_worker": cpus,
                                               "deepspeed.stage": stage})
    cfg = resolve(cfg, probe_cluster())  # what open_run does for a run
    started = time.perf_counter()
    request = StudentRequest(generation=0, init_model=model_dir, label_names=label_names, rows=rows,
                             model_dest=str(workdir / f"student-{label}"), ray_storage=str(workdir / "_ray_train"))
    m = fit_student(cfg, request, ds, on_gpu=False, say=lambda line: None)
    return {"train_seconds": m["train_seconds"], "call_seconds": time.perf_counter() - started,
            "setup_seconds": m["setup_seconds"], "save_seconds": m["save_seconds"],
            "steps": m["steps"], "samples": m["steps"] * BATCH * workers,
            "samples_per_second": m["samples_per_second"]}


def bench_student(workdir: Path, ds, model_dir: str, label_names: list[str]) -> dict[str, Any]:
    from incr_ray.generation.trainer import steps_for

    rows = ds.count()
    out: dict[str, Any] = {"rows": rows}
    max_steps = steps_for(rows, 1, BATCH, 1.0, 1)
    out["plain"] = plain_training(model_dir, label_names, ds.take_all(), max_steps)
    out["collate"] = collate_seconds(model_dir, label_names, ds.take_all())
    out["plain_ray_data"] = plain_training(model_dir, label_names, [], max_steps, ray_ds=ds)
    # The defaults (stage and CPUs auto: ZeRO-0, 1 worker × 2 threads here) against what they
    # replace: ZeRO-2, which the CPU config used to pin, and 1 thread, the old cpus_per_worker.
    for label, workers, cpus, stage in STUDENT_PATHS:
        out[label] = ray_training(workdir, ds, model_dir, label_names, label, workers, cpus, stage)
    for label in ("plain_ray_data", *(path[0] for path in STUDENT_PATHS)):
        r, p = out[label], out["plain"]
        r["ratio_in_loop"] = r["samples_per_second"] / p["samples_per_second"]
        r["ratio_whole_call"] = (r["samples"] / r["call_seconds"]) / (p["samples"] / p["call_seconds"])
    return out


# ---------------------------------------------------------------------------------------------
# 3. End to end and growth


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


# The driver's steps of a generation, as the profile of the largest incremental run finds them:
# (label, file suffix, function). Cumulative seconds; a step inside another counts in both.
DRIVER_STEPS = (
    ("read the block (split filter)", "incr_ray/run/folder.py", "block"),
    ("teacher scoring (pool + write)", "incr_ray/run/loop.py", "score_generation"),
    ("  teacher statistics (stored targets)", "incr_ray/generation/teacher.py", "teacher_block_stats"),
    ("student fit (fit_student)", "incr_ray/generation/student.py", "fit_student"),
    ("  training order", "incr_ray/generation/student.py", "shuffled_for_training"),
    ("  Dataset.materialize (order, holdout, slices)", "ray/data/dataset.py", "materialize"),
    ("  TorchTrainer.fit", "ray/train/v2/api/data_parallel_trainer.py", "fit"),
    ("flip rates and retention", "incr_ray/run/loop.py", "_continual"),
    ("model card", "incr_ray/run/model_card.py", "write_model_card"),
    ("run.json writes", "incr_ray/run/folder.py", "save"),
)


def driver_profile(stats, generations: int) -> list[dict[str, Any]]:
    """Mean seconds per generation of each of :data:`DRIVER_STEPS` from a ``pstats.Stats``."""
    rows = []
    for label, suffix, name in DRIVER_STEPS:
        hits = [(v[1], v[3]) for (file, _, func), v in stats.stats.items() if func == name and file.endswith(suffix)]
        calls, seconds = sum(h[0] for h in hits), sum(h[1] for h in hits)
        rows.append({"step": label, "calls": calls, "seconds_per_generation": seconds / generations})
    return rows


def bench_order(ds, sizes: list[int]) -> dict[str, Any]:
    """Seconds to put a block in training order: in memory on the driver (what blocks up to
    ``LOCAL_ORDER_ROWS`` rows get) against Ray Data's distributed sort (larger blocks)."""
    from incr_ray.generation.student import shuffled_for_training

    out = []
    for n in sizes:
        part = ds.limit(n).materialize()
        row = {"rows": n}
        for label, local in (("in_memory", n), ("ray_sort", 0)):
            started = time.perf_counter()
            ordered = shuffled_for_training(part, seed=0, rows=n, local_rows=local)
            row[label] = time.perf_counter() - started
            assert ordered.count() == n
        out.append(row)
    return {"sizes": out}


def bench_ray_train_floor(workdir: Path, repeats: int = 2) -> dict[str, Any]:
    """Ray Train's own start-up and shutdown: ``TorchTrainer.fit`` of a function that does nothing
    (1 worker × 2 CPUs, as the students), and the import of the students' module in a fresh
    process, which a real worker pays before its function begins."""
    import subprocess

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def mark_entry(config: dict[str, Any]) -> None:  # local: pickled by value, whoever imports this script
        import time

        with open(config["mark"], "w") as f:
            f.write(str(time.time()))

    fits = []
    for i in range(repeats):
        mark = workdir / f"ray-train-floor-{i}"
        started = time.time()
        TorchTrainer(mark_entry, train_loop_config={"mark": str(mark)},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": THREADS}),
                     run_config=RunConfig(name=f"floor-{i}", storage_path=str(workdir / "_ray_train_floor"))).fit()
        ended, entered = time.time(), float(mark.read_text())
        fits.append({"start_seconds": entered - started, "stop_seconds": ended - entered})
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import incr_ray.generation.student"], check=True, cwd=ROOT)
    return {"fits": fits, "start_seconds": float(np.mean([f["start_seconds"] for f in fits])),
            "stop_seconds": float(np.mean([f["stop_seconds"] for f in fits])),
            "student_import_seconds": time.perf_counter() - started}


def _k_blocks_profiled(cfg) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    try:
        manifest = run_k_blocks(cfg)
    finally:
        profile.disable()
    return manifest, driver_profile(pstats.Stats(profile), len(manifest["generations"]))


def bench_end_to_end(workdir: Path, sizes: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {"sizes": sizes, "incremental": [], "full": [], "hard_label": []}
    runs = [(n, method) for n in sizes for method in ("incremental", "full")]
    runs.append((sizes[0], "hard_label"))  # threshold 1: the same run without teacher scoring
    for n, method in runs:
        cfg = config(workdir, f"e2e-{method}-{n}", n, **({"method.threshold": 1.0} if method == "hard_label" else {}))
        print(f"  {method}, {n} rows", flush=True)
        started = time.perf_counter()
        if method == "full":
            manifest = run_full_fine_tune(cfg)
        elif method == "incremental" and n == sizes[-1]:
            manifest, out["driver_profile"] = _k_blocks_profiled(cfg)
        else:
            manifest = run_k_blocks(cfg)
        wall = time.perf_counter() - started
        gens = manifest["generations"]
        out[method].append({
            "rows": n, "training_rows": sum(g["rows"] for g in gens), "wall_seconds": wall,
            "final_accuracy": gens[-1]["metrics"]["accuracy"],
            "generations": [
                {"rows": g["rows"], "seconds": g["seconds"], "fit_seconds": g["train"]["fit_seconds"],
                 "train_seconds": g["train"]["train_seconds"], "setup_seconds": g["train"]["setup_seconds"],
                 "save_seconds": g["train"]["save_seconds"], "scoring_seconds": g.get("scoring_seconds") or 0.0,
                 "eval_seconds": g["eval_seconds"], "ray_start_seconds": g["train"]["fit_startup_seconds"],
                 "ray_stop_seconds": g["train"]["fit_shutdown_seconds"]}
                for g in gens
            ],
        })
    for method in ("incremental", "full"):
        a, b = fit_line([r["rows"] for r in out[method]], [r["wall_seconds"] for r in out[method]])
        out[f"{method}_fit"] = {"fixed_seconds": a, "seconds_per_row": b}
    out["ratios"] = [i["wall_seconds"] / f["wall_seconds"] for i, f in zip(out["incremental"], out["full"])]
    inc, full = out["incremental_fit"], out["full_fit"]
    out["ratio_per_row"] = inc["seconds_per_row"] / full["seconds_per_row"]
    # Mean fixed cost per incremental generation, taken apart: everything but the training loop.
    gens = [g for r in out["incremental"] for g in r["generations"]]
    out["per_generation"] = {
        key: float(np.mean([g[key] for g in gens]))
        for key in ("seconds", "fit_seconds", "train_seconds", "setup_seconds", "save_seconds", "scoring_seconds",
                    "eval_seconds", "ray_start_seconds", "ray_stop_seconds")
    }
    out["per_generation"]["fit_startup_seconds"] = float(np.mean(
        [g["fit_seconds"] - g["train_seconds"] - g["setup_seconds"] - g["save_seconds"] - g["eval_seconds"]
         for g in gens]))
    out["per_generation"]["fixed_seconds"] = float(np.mean([g["seconds"] - g["train_seconds"] for g in gens]))
    # threshold 1 against the default at the smallest size: what skipping the teacher saves.
    hard, same = out["hard_label"][0], out["incremental"][0]
    out["hard_label_ratio"] = hard["wall_seconds"] / same["wall_seconds"]
    out["hard_label_saved_per_generation"] = float(np.mean(
        [i["seconds"] - h["seconds"] for i, h in zip(same["generations"][1:], hard["generations"][1:])]))
    return out


# ---------------------------------------------------------------------------------------------
# 4. Memory (benchmarks/zero_memory.py's measurement) and 5. FLOP/s


def bench_memory() -> dict[str, Any]:
    import zero_memory
    from transformers import AutoTokenizer, LlamaConfig

    from incr_ray.modeling import minilm_dir
    from incr_ray.plan import count_parameters

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    mcfg = zero_memory.model_config(tok.vocab_size, tok.pad_token_id, 1024, 8, 2816)
    params, _ = count_parameters(LlamaConfig(**mcfg))
    loop = {"model": mcfg, "steps": 3, "batch_size": 2, "seq_len": 32}
    storage = tempfile.mkdtemp(prefix="throughput-zero-")
    out: dict[str, Any] = {"params": params, "workers": zero_memory.WORKERS}
    try:
        for label, stage in (("zero0", 0), ("zero3", 3)):
            r = zero_memory.run_case(label, {"stage": stage}, loop, storage)
            if "error" in r:
                raise RuntimeError(f"memory case {label} failed: {r['error']}")
            m = r["max_over_ranks"]
            out[label] = {"states_bytes": m["states_rss_delta"], "peak_rss_bytes": m["peak_rss"],
                          "live_tensor_bytes": m["live_tensor_bytes"],
                          "planner_bytes": zero_memory.predicted_bytes(params, {"stage": stage})["total_bytes"]}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    out["states_ratio"] = out["zero3"]["states_bytes"] / out["zero0"]["states_bytes"]
    out["peak_ratio"] = out["zero3"]["peak_rss_bytes"] / out["zero0"]["peak_rss_bytes"]
    out["planner_ratio"] = out["zero3"]["planner_bytes"] / out["zero0"]["planner_bytes"]
    out["paper_ratio"] = 1 / zero_memory.WORKERS  # 16Ψ/N against 16Ψ
    return out


def matmul_peak_flops(size: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 FLOP/s of a square matmul on ``THREADS`` threads."""
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / (time.perf_counter() - t))
    return best


def bench_flops(ds, model_dir: str, student: dict[str, Any]) -> dict[str, Any]:
    """Model FLOPs of training (6·Ψ·tokens) per in-loop second, against the matmul peak.

    Tokens are the rows' real (unpadded, truncated) tokens, so the figure counts useful work only.
    """
    from incr_ray.modeling import load_classifier, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_classifier(model_dir, tokenizer=tok)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    texts = [str(r["text"]) for r in ds.take_all()]
    tokens_per_row = float(np.mean([len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]]))
    peak = matmul_peak_flops()
    out = {"params": params, "embedding_params": embedding, "tokens_per_row": tokens_per_row, "matmul_peak_flops": peak}
    for label in ("plain", "ray_1x2"):
        flops = 6 * params * tokens_per_row * student[label]["samples_per_second"]
        out[label] = {"flops": flops, "fraction_of_peak": flops / peak,
                      "non_embedding_fraction_of_peak": flops * (params - embedding) / params / peak}
    return out


# ---------------------------------------------------------------------------------------------
# Report


def verdicts(r: dict[str, Any]) -> list[dict[str, Any]]:
    t, s, e, m = r["teacher"], r["student"], r["end_to_end"], r.get("memory")
    largest = len(e["sizes"]) - 1
    items = [
        ("teacher scoring ≥ 0.85× plain loop, steady state", t["ray_1x2"]["ratio_marginal"] >= 0.85,
         f"{t['ray_1x2']['ratio_marginal']:.2f}× (1 actor × 2 threads)"),
        ("teacher scoring ≥ 0.85× plain loop, whole call", t["ray_1x2"]["ratio_whole_call"] >= 0.85,
         f"{t['ray_1x2']['ratio_whole_call']:.2f}× (actor start-up included)"),
        ("student training ≥ 0.9× plain HF Trainer, in the training loop", s["ray_1x2"]["ratio_in_loop"] >= 0.9,
         f"{s['ray_1x2']['ratio_in_loop']:.2f}×"),
        (f"student training ≥ 0.75× plain HF Trainer, whole call at {s['rows']} rows",
         s["ray_1x2"]["ratio_whole_call"] >= 0.75, f"{s['ray_1x2']['ratio_whole_call']:.2f}× (start-up included)"),
        (f"end to end k=4 ≤ 1.6× full fine-tune at {e['sizes'][largest]} rows", e["ratios"][largest] <= 1.6,
         f"{e['ratios'][largest]:.2f}×"),
        ("end to end k=4 ≤ 1.4× full fine-tune per extra row (slope)", e["ratio_per_row"] <= 1.4,
         f"{e['ratio_per_row']:.2f}×"),
        ("fixed cost per generation ≤ 12 s (outside the training loop)", e["per_generation"]["fixed_seconds"] <= 12,
         f"{e['per_generation']['fixed_seconds']:.1f} s"),
    ]
    if m is not None:
        items.append(("ZeRO-3 model states ≤ 0.6× ZeRO-0 (2 workers)", m["states_ratio"] <= 0.6,
                      f"{m['states_ratio']:.2f}× (paper 16Ψ/N: {m['paper_ratio']:.2f}×; planner {m['planner_ratio']:.2f}×)"))
    return [{"goal": g, "met": bool(ok), "figures": f} for g, ok, f in items]


def render(r: dict[str, Any]) -> str:
    MiB = 2**20
    t, s, e, m, f = r["teacher"], r["student"], r["end_to_end"], r.get("memory"), r["flops"]
    lines = [f"MiniLM (22.7M parameters), Rotten Tomatoes, max_length {MAX_LENGTH}, {THREADS} threads per side.", ""]
    rows = []
    for label, name in (("plain", "plain HF loop, 2 threads"), ("ray_1x2", "Ray Data pool, 1 actor × 2 threads"),
                        ("ray_2x1", "Ray Data pool, 2 actors × 1 thread")):
        x = t[label]
        marginal = x.get("marginal_rows_per_s")
        rows.append([name, f"{x['seconds']:.1f}", f"{x['rows_per_s']:.0f}", f"{x.get('ratio_whole_call', 1.0):.2f}",
                     "—" if marginal is None else f"{marginal:.0f}",
                     "—" if marginal is None else f"{x.get('ratio_marginal', 1.0):.2f}"])
    lines += [f"**Teacher scoring** ({t['rows']} rows, batch {TEACHER_BATCH}; whole call includes start-up, "
              f"marginal = extra rows/s from {t['half_rows']} to {t['rows']} rows)", "",
              markdown_table(["path", "seconds", "rows/s", "× plain", "marginal rows/s", "× plain (marginal)"], rows), ""]
    rows = []
    for label, name in STUDENT_NAMES.items():
        x = s[label]
        rows.append([name, x["samples"], f"{x['train_seconds']:.1f}", f"{x['samples_per_second']:.1f}",
                     f"{x.get('ratio_in_loop', 1.0):.2f}", f"{x['call_seconds']:.1f}",
                     f"{x.get('ratio_whole_call', 1.0):.2f}"])
    lines += [f"**Student training** ({s['rows']} rows, batch {BATCH} per worker, one pass)", "",
              markdown_table(["path", "samples", "loop s", "samples/s", "× plain (loop)", "whole call s", "× plain (call)"], rows), ""]
    if "collate" in s:
        lines += [f"The collate (tokenize, pad, targets) of all {s['rows']} rows took {s['collate']:.2f} s, "
                  f"{100 * s['collate'] / s['plain']['train_seconds']:.1f}% of the plain loop: the most that "
                  "tokenizing ahead in Ray Data could save here.", ""]
    rows = []
    for i, n in enumerate(e["sizes"]):
        inc, full = e["incremental"][i], e["full"][i]
        rows.append([n, inc["training_rows"], f"{inc['wall_seconds']:.0f}", f"{full['wall_seconds']:.0f}", f"{e['ratios'][i]:.2f}",
                     f"{inc['final_accuracy']:.3f}", f"{full['final_accuracy']:.3f}"])
    ifit, ffit, pg = e["incremental_fit"], e["full_fit"], e["per_generation"]
    lines += ["**End to end and growth** (k=4 incremental run vs one full fine-tune; 10% holdout; split, "
              "scoring and evaluation included)", "",
              markdown_table(["rows", "training rows", "k=4 s", "full FT s", "ratio", "k=4 acc", "full acc"], rows), "",
              f"Fitted lines: k=4 = {ifit['fixed_seconds']:.0f} s + {1000 * ifit['seconds_per_row']:.1f} ms/row; "
              f"full FT = {ffit['fixed_seconds']:.0f} s + {1000 * ffit['seconds_per_row']:.1f} ms/row "
              f"(per-row ratio {e['ratio_per_row']:.2f}×).",
              f"Fixed cost per incremental generation (mean over {len(e['sizes']) * 4} generations): "
              f"{pg['seconds'] - pg['train_seconds']:.0f} s of its {pg['seconds']:.0f} s outside the training loop — "
              f"Ray Train start/stop {pg['fit_startup_seconds']:.0f} s (fit() to the worker function "
              f"{pg['ray_start_seconds']:.1f} s, its last report to fit()'s return {pg['ray_stop_seconds']:.1f} s), worker set-up (imports, model load, "
              f"DeepSpeed) {pg['setup_seconds']:.0f} s, save {pg['save_seconds']:.1f} s, teacher scoring "
              f"{pg['scoring_seconds']:.0f} s, holdout evaluation in the workers {pg['eval_seconds']:.1f} s, other "
              f"(block reads, shuffle, bookkeeping) {pg['seconds'] - pg['fit_seconds'] - pg['scoring_seconds']:.0f} s.", ""]
    if "hard_label" in e and e["hard_label"]:
        lines += [f"`method.threshold: 1` (every target one-hot) skips teacher scoring: the k=4 run at {e['sizes'][0]} rows "
                  f"took {e['hard_label'][0]['wall_seconds']:.0f} s against {e['incremental'][0]['wall_seconds']:.0f} s "
                  f"({e['hard_label_ratio']:.2f}×), {e['hard_label_saved_per_generation']:.1f} s less per generation "
                  "after the first.", ""]
    if "driver_profile" in e:
        lines += [f"**The driver's steps** (cProfile of the {e['sizes'][-1]}-row k=4 run; cumulative seconds per "
                  "generation, an indented step is part of the one above)", "",
                  markdown_table(["step", "calls", "s per generation"],
                                 [[x["step"].replace("  ", "↳ "), x["calls"], f"{x['seconds_per_generation']:.1f}"]
                                  for x in e["driver_profile"]]), ""]
    fl = r.get("ray_train_floor")
    if fl:
        lines += [f"Ray Train's own floor: `TorchTrainer.fit` of a function that does nothing took {fl['start_seconds']:.1f} s "
                  f"from fit() to the function and {fl['stop_seconds']:.1f} s after it (mean of {len(fl['fits'])}); "
                  f"importing the students' module (torch, transformers' Trainer) in a fresh process took "
                  f"{fl['student_import_seconds']:.1f} s, which every training worker pays before its function begins.", ""]
    o = r.get("order")
    if o:
        lines += ["**Training order** (seconds to put a block in its seeded order)", "",
                  markdown_table(["rows", "in memory on the driver (≤ 200,000 rows)", "Ray Data sort (larger blocks)"],
                                 [[x["rows"], f"{x['in_memory']:.2f}", f"{x['ray_sort']:.2f}"] for x in o["sizes"]]), ""]
    lines += [] if m is None else [f"**Memory** (Llama-style, Ψ = {m['params']:,}, fp32, {m['workers']} workers; MiB per worker)", "",
              markdown_table(["config", "model states (measured)", "planner", "peak RSS"], [
                  [lab, f"{m[key]['states_bytes'] / MiB:.0f}", f"{m[key]['planner_bytes'] / MiB:.0f}",
                   f"{m[key]['peak_rss_bytes'] / MiB:.0f}"] for lab, key in (("ZeRO-0", "zero0"), ("ZeRO-3", "zero3"))]),
              "",
              f"ZeRO-3 / ZeRO-0: model states {m['states_ratio']:.2f}×, peak RSS {m['peak_ratio']:.2f}×; "
              f"the ZeRO paper's 16Ψ/N gives {m['paper_ratio']:.2f}×, the planner (fp32 on CPU) {m['planner_ratio']:.2f}×.", ""]
    lines += [f"**FLOP/s** (6 · {f['params'] / 1e6:.1f}M parameters · {f['tokens_per_row']:.1f} real tokens per row)", "",
              markdown_table(["path", "GFLOP/s", "of matmul peak", "non-embedding share"], [
                  ["fp32 matmul peak (2048², 2 threads)", f"{f['matmul_peak_flops'] / 1e9:.1f}", "1.00", ""],
                  ["plain HF Trainer", f"{f['plain']['flops'] / 1e9:.1f}", f"{f['plain']['fraction_of_peak']:.2f}",
                   f"{f['plain']['non_embedding_fraction_of_peak']:.2f}"],
                  ["Ray Train + DeepSpeed, 1 worker", f"{f['ray_1x2']['flops'] / 1e9:.1f}",
                   f"{f['ray_1x2']['fraction_of_peak']:.2f}", f"{f['ray_1x2']['non_embedding_fraction_of_peak']:.2f}"]]),
              "", "Goals:", ""]
    lines += [f"- {'MET' if v['met'] else 'MISSED'}: {v['goal']} ({v['figures']})" for v in r["verdicts"]]
    return "\n".join(lines)


def plot(r: dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = r["end_to_end"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = np.linspace(0, max(e["sizes"]) * 1.05, 50)
    for method, label in (("incremental", "k=4 incremental"), ("full", "full fine-tune")):
        dots = ax1.plot(e["sizes"], [x["wall_seconds"] for x in e[method]], "o", label=label)
        fit = e[f"{method}_fit"]
        ax1.plot(xs, fit["fixed_seconds"] + fit["seconds_per_row"] * xs, "--", alpha=0.6, color=dots[0].get_color())
    ax1.set_xlabel("rows")
    ax1.set_ylabel("wall seconds")
    ax1.set_title("end to end: wall time against rows")
    ax1.legend()
    ax1.grid(alpha=0.3)
    pg = e["per_generation"]
    parts = {"Ray Train start/stop": pg["fit_startup_seconds"], "worker set-up": pg["setup_seconds"],
             "training loop": pg["train_seconds"], "save": pg["save_seconds"], "teacher scoring": pg["scoring_seconds"],
             "evaluation": pg["eval_seconds"]}
    parts["other (reads, shuffle, bookkeeping)"] = pg["seconds"] - sum(parts.values())
    ax2.barh(list(parts), list(parts.values()))
    ax2.set_xlabel("seconds (mean per incremental generation)")
    ax2.set_title("where one generation's time goes")
    ax2.grid(alpha=0.3, axis="x")
    return figure_png(fig)


def begin(workdir: Path) -> Path:
    """An empty ``workdir`` (resolved), ``THREADS`` torch threads in this process, and the local Ray."""
    import torch

    workdir = workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    torch.set_num_threads(THREADS)
    start_local_ray()
    return workdir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher-rows", type=int, default=2000)
    p.add_argument("--student-rows", type=int, default=640)
    p.add_argument("--n", type=int, default=750, help="growth is measured at n, 2n and 4n rows")
    p.add_argument("--skip-memory", action="store_true", help="leave out part 4 (about 3 minutes; for a quick look)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "benchmarks" / "throughput")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--render-only", action="store_true",
                   help="re-render the tables and plot from an earlier run's throughput.json in --out")
    a = p.parse_args(argv)
    if a.render_only:
        r = json.loads((a.out / "throughput.json").read_text())
        r["verdicts"] = verdicts(r)
        text = render(r) + f"\n\nTotal wall time {r['wall_seconds'] / 60:.1f} min."
        print(text)
        write_results("throughput", r, text, plot(r), a.out)
        return 0
    started = time.perf_counter()
    workdir = begin(a.workdir)
    r: dict[str, Any] = {"machine": machine(), "settings": {
        "threads": THREADS, "max_length": MAX_LENGTH, "batch": BATCH, "teacher_batch": TEACHER_BATCH,
        "teacher_rows": a.teacher_rows, "student_rows": a.student_rows, "sizes": [a.n, 2 * a.n, 4 * a.n]}}
    ds, label_names = training_rows(workdir, max(a.teacher_rows, a.student_rows))
    model_dir = classifier_folder(workdir, label_names)
    print("1. teacher scoring", flush=True)
    r["teacher"] = bench_teacher(workdir, ds.limit(a.teacher_rows).materialize())
    print("2. student training", flush=True)
    student_ds = ds.limit(a.student_rows).materialize()
    r["student"] = bench_student(workdir, student_ds, model_dir, label_names)
    print("3. training order, end to end and growth", flush=True)
    r["order"] = bench_order(ds, [a.student_rows, max(a.teacher_rows, a.student_rows)])
    r["ray_train_floor"] = bench_ray_train_floor(workdir)
    r["end_to_end"] = bench_end_to_end(workdir, r["settings"]["sizes"])
    if not a.skip_memory:
        print("4. memory, ZeRO-0 vs ZeRO-3", flush=True)
        r["memory"] = bench_memory()
    print("5. FLOP/s", flush=True)
    r["flops"] = bench_flops(student_ds, model_dir, r["student"])
    r["wall_seconds"] = time.perf_counter() - started
    r["verdicts"] = verdicts(r)
    text = render(r) + f"\n\nTotal wall time {r['wall_seconds'] / 60:.1f} min."
    print(text)
    write_results("throughput", r, text, plot(r), a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
