"""Where the student loop's gap to a plain HF Trainer goes: the same loop with one piece of the
pipeline added at a time.

    python benchmarks/student_gap.py                            # about 22 min on 2 cores (4 rounds)
    python benchmarks/student_gap.py --rows 96 --repeats 1 --out /tmp/gap   # the script end to end

``throughput.py`` measures the students' loop at about 0.7× a plain ``transformers.Trainer`` and a
plain Trainer fed by Ray Data at about 0.9×. This takes the rest apart. Every path trains the
same MiniLM classifier (random head) on the same rows for the same steps (one pass, batch 32,
the same lr, 2 threads) and is timed inside ``trainer.train()``:

- ``plain``: a plain Trainer in a fresh Python process: the reference;
- ``deepspeed``: the same with the project's DeepSpeed config (``build_deepspeed_config``, ZeRO-0,
  fp32, DeepSpeed's CPU accelerator, a one-process gloo group): what DeepSpeed's engine costs;
- ``ray_task``: the plain Trainer inside a Ray task with 2 CPUs: what a Ray worker process costs;
- ``ray_task_deepspeed``: both;
- ``ray_data``: the plain Trainer in the driver, fed by Ray Data's ``iter_torch_batches``;
- ``fit_student``: the pipeline's student (``generation.student.fit_student`` with the defaults:
  Ray Train, DeepSpeed ZeRO-0, Ray Data, the soft-target loss).

The paths run ``--repeats`` times, interleaved (all paths, then all again), so that drift on the
machine touches each alike, and every other round runs them in reverse order, so that no path
always runs first or last (:func:`round_order`); each ratio is taken against the ``plain`` fit of
the same round, and the mean and range over rounds are reported. Results go to
``benchmarks/results/student_gap.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import harness  # environment before ray
from harness import ROOT, machine, markdown_table, write_results
from throughput import BATCH, THREADS, begin, classifier_folder, plain_training, ray_training, training_rows

from incr_ray.generation.local_group import free_port

HERE = Path(__file__).resolve().parent
PATHS: tuple[tuple[str, str], ...] = (
    ("plain", "plain HF Trainer, fresh process"),
    ("deepspeed", "+ DeepSpeed ZeRO-0 engine, fresh process"),
    ("ray_task", "plain HF Trainer in a Ray task (2 CPUs)"),
    ("ray_task_deepspeed", "+ DeepSpeed ZeRO-0, in a Ray task"),
    ("ray_data", "plain HF Trainer fed by Ray Data (driver)"),
    ("fit_student", "the students' fit_student (Ray Train + DeepSpeed + Ray Data)"),
)


def train_once(job: dict[str, Any]) -> dict[str, float]:
    """One plain Trainer fit of ``job`` in this process (with DeepSpeed's engine when asked)."""
    import os

    if str(HERE) not in sys.path:  # a Ray worker starts elsewhere
        sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(THREADS)
    ds_config = None
    if job["deepspeed"]:
        # One process of its own group, on loopback; the students' workers get theirs from Ray Train.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
        import deepspeed

        from incr_ray.config import DeepSpeedSection
        from incr_ray.generation.deepspeed_config import build_deepspeed_config

        deepspeed.init_distributed(dist_backend="gloo")
        ds_config = build_deepspeed_config(DeepSpeedSection(stage=0), on_gpu=False, precision="fp32")
    return plain_training(job["model_dir"], job["label_names"], job["rows"], job["max_steps"], deepspeed=ds_config)


def in_fresh_process(job: dict[str, Any], workdir: Path) -> dict[str, float]:
    """:func:`train_once` in a new Python process (the job goes through a JSON file)."""
    job_file, out_file = workdir / "job.json", workdir / "result.json"
    job_file.write_text(json.dumps(job))
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(job_file), str(out_file)],
                   check=True, cwd=ROOT)
    return json.loads(out_file.read_text())


def in_ray_task(job: dict[str, Any]) -> dict[str, float]:
    """:func:`train_once` in a fresh Ray worker process with 2 CPUs (max_calls=1: nothing left from before)."""
    import ray

    return ray.get(ray.remote(num_cpus=THREADS, max_calls=1)(train_once).remote(job))


def round_order(i: int) -> list[str]:
    """The paths in the order round ``i`` runs them: as listed in even rounds, reversed in odd ones."""
    names = [name for name, _ in PATHS]
    return names if i % 2 == 0 else names[::-1]


def with_ratios(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per path: samples/s in each round, and its ratio to the same round's ``plain``."""
    out: dict[str, Any] = {}
    for name, _ in PATHS:
        rates = [r[name]["samples_per_second"] for r in rounds]
        ratios = [r[name]["samples_per_second"] / r["plain"]["samples_per_second"] for r in rounds]
        out[name] = {"samples_per_second": rates, "ratios": ratios, "ratio": sum(ratios) / len(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "train_seconds": [r[name]["train_seconds"] for r in rounds]}
    return out


def render(r: dict[str, Any]) -> str:
    s = r["settings"]
    rows = [[label, " / ".join(f"{x:.1f}" for x in r["paths"][name]["samples_per_second"]),
             f"{r['paths'][name]['ratio']:.2f}× ({r['paths'][name]['ratio_min']:.2f}–{r['paths'][name]['ratio_max']:.2f})"]
            for name, label in PATHS]
    return (f"# Where the student loop's gap goes\n\n{s['rows']} rows, {s['steps']} steps at batch {BATCH}, "
            f"{THREADS} threads, {s['repeats']} interleaved round(s), every other one in reverse order; "
            "samples/s inside `trainer.train()`.\n\n"
            + markdown_table(["path", "samples/s per round", "÷ plain (range)"], rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=640)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "benchmarks" / "student_gap")
    p.add_argument("--out", type=Path, default=harness.RESULTS)
    p.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.child[1].write_text(json.dumps(train_once(json.loads(a.child[0].read_text()))))
        return 0
    started = time.perf_counter()
    workdir = begin(a.workdir)
    from incr_ray.generation.trainer import steps_for

    ds, label_names = training_rows(workdir, a.rows)
    model_dir = classifier_folder(workdir, label_names)
    steps = steps_for(a.rows, 1, BATCH, 1.0, 1)
    job = {"model_dir": model_dir, "label_names": label_names, "rows": ds.take_all(), "max_steps": steps}
    for row in job["rows"]:
        row["label"] = int(row["label"])  # JSON for the fresh process
        row["row_id"] = int(row["row_id"])
    fits = {
        "plain": lambda i: in_fresh_process({**job, "deepspeed": False}, workdir),
        "deepspeed": lambda i: in_fresh_process({**job, "deepspeed": True}, workdir),
        "ray_task": lambda i: in_ray_task({**job, "deepspeed": False}),
        "ray_task_deepspeed": lambda i: in_ray_task({**job, "deepspeed": True}),
        "ray_data": lambda i: plain_training(model_dir, label_names, [], steps, ray_ds=ds),
        "fit_student": lambda i: ray_training(workdir, ds, model_dir, label_names, f"gap-{i}", 1, "auto", "auto"),
    }
    rounds = []
    for i in range(a.repeats):
        print(f"round {i + 1} of {a.repeats}: {', '.join(round_order(i))}", flush=True)
        rounds.append({name: fits[name](i) for name in round_order(i)})
    r = {"machine": machine(), "settings": {"rows": a.rows, "steps": steps, "repeats": a.repeats},
         "rounds": rounds, "orders": [round_order(i) for i in range(a.repeats)], "paths": with_ratios(rounds),
         "wall_seconds": time.perf_counter() - started}
    text = render(r) + f"\n\nTotal wall time {r['wall_seconds'] / 60:.1f} min."
    print(text)
    write_results("student_gap", r, text, None, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
