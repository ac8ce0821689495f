"""The generation loop: split once, then score → target → train → evaluate, block by block.

Everything a run produces lands in its run folder, and ``run.json`` records each step as it
finishes, so the same command after a crash continues where the last one stopped: the split is
never redone, a scored block is never rescored, a trained model is never retrained.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.expressions import col, lit

from .. import faults
from ..config import Config, ConfigError, config_from_dict
from ..data import HOLDOUT, read_labelled_file, replay_rows
from ..data.errors import exception_chain
from ..generation.evaluation import evaluate_model
from ..generation.student import StudentRequest, fit_student
from ..generation.teacher import score_block
from ..modeling import NonFiniteError
from ..storage import drop_staged, is_remote, remove_tree, rename_tree, write_bytes_atomic
from .folder import Run, cluster_has_gpu, on_every_node, open_finished, open_run, read_manifest
from .manifest import GenerationEntry, RunError, now
from .report import plot_png, render_report, summary_line


# Errors a Ray worker or actor can only find there (its GPU's bf16 support, NaN in its forward)
# that the user can fix: they reach the console as their own one line, not in Ray's wrappers.
WORKER_USER_ERRORS = (NonFiniteError, ConfigError)


@contextmanager
def _worker_failures_reported(say):
    """User errors found in a worker or actor reach the console as their own one line; any other
    worker failure first shows what the failing workers printed (Ray keeps it in log files, and
    shortens the error it raises to 1,000 characters)."""
    try:
        yield
    except WORKER_USER_ERRORS:
        raise
    except Exception as err:
        chain = exception_chain(err)
        found = next((e for e in chain if isinstance(e, WORKER_USER_ERRORS)), None)
        if found is not None:
            kind = next(k for k in WORKER_USER_ERRORS if isinstance(found, k))
            raise kind(str(found.args[0]) if found.args else str(found)) from None
        # Ray Data's UDF wrapper keeps only the text of the actor's exception.
        for kind in WORKER_USER_ERRORS:
            match = re.search(rf"{kind.__name__}: (.+)", str(err))
            if match:
                raise kind(match.group(1).strip()) from None
        for e in chain:
            for note in getattr(e, "__notes__", ()):
                say(note)
        raise


def score_generation(run: Run, g: int, block_ds, teacher_model: str) -> int:
    """Teacher outputs + targets for block ``g`` (and replay rows) into gen_g/targets. Returns rows."""
    entry = run.manifest.entry(g)
    block_rows = block_ds.count()
    ds = block_ds.with_column("replay", lit(False))
    replay = replay_rows(run.split_dataset(), g, block_rows, run.cfg.replay.fraction,
                         run.manifest.data.block_sizes, run.cfg.run.seed)
    if replay is not None:
        ds = ds.union(replay.with_column("replay", lit(True)))
    run.say(f"[gen {g}] teacher {run.rel(teacher_model)} scores {block_rows} rows"
            + (" + replay" if replay is not None else ""))
    dest = run.paths.targets(g)
    tmp = dest + ".tmp"
    remove_tree(tmp)
    started = time.perf_counter()
    with _worker_failures_reported(run.say):
        score_block(ds, teacher_model, run.cfg, run.on_gpu).write_parquet(tmp)
    rename_tree(tmp, dest)
    rows = ray.data.read_parquet(dest).count()
    entry.targets, entry.rows, entry.block_rows = run.rel(dest), rows, block_rows
    entry.replay_rows, entry.scoring_seconds = rows - block_rows, time.perf_counter() - started
    run.save()
    return rows


def run_generation(run: Run, g: int, block_ds, teacher_model: str | None, extended: bool = False) -> GenerationEntry:
    """Score (g ≥ 1), train and evaluate generation ``g``; resumes inside the generation too."""
    cfg = run.cfg
    entry = run.manifest.entry(g)
    if entry.status == "finished":
        return entry
    started = time.perf_counter()
    entry.started = entry.started or now()
    entry.status = "running"
    if extended:
        entry.extended = True
    run.save()

    # Targets: one-hot labels for generation 0, the teacher's corrected distribution after it.
    if teacher_model is None:
        train_ds = block_ds.select_columns(["row_id", "text", "label"])
        entry.rows = entry.rows or train_ds.count()
    else:
        if not entry.targets:
            score_generation(run, g, block_ds, teacher_model)
        train_ds = ray.data.read_parquet(run.paths.join(entry.targets)).select_columns(
            ["row_id", "text", "label", "target"])

    # Train, then evaluate in the same workers.
    model_dest = run.paths.model(g)
    if not entry.model:
        init = teacher_model if (teacher_model and cfg.student.init == "previous") else run.base_model
        run.say(f"[gen {g}] training student on {entry.rows} rows from {run.rel(init)} "
                f"({cfg.cluster.workers} worker(s), ZeRO-{cfg.deepspeed.stage}), then evaluating it on the holdout")
        request = StudentRequest(generation=g, init_model=init, label_names=run.label_names, rows=entry.rows,
                                 model_dest=model_dest, ray_storage=run.paths.ray_train)
        with _worker_failures_reported(run.say):
            train = fit_student(cfg, request, train_ds, run.on_gpu, holdout_ds=run.holdout(), say=run.say)
        entry.metrics, entry.eval_seconds = train.pop("holdout"), train.pop("eval_seconds")
        entry.model, entry.train = run.rel(model_dest), train
        run.save()
    if not entry.metrics:  # trained by an earlier attempt that stopped before evaluating
        run.say(f"[gen {g}] evaluating on the holdout")
        evaluating = time.perf_counter()
        entry.metrics = evaluate_model(run.holdout(), model_dest, cfg, run.on_gpu)
        entry.eval_seconds = time.perf_counter() - evaluating
    entry.seconds = (entry.seconds or 0.0) + time.perf_counter() - started
    entry.finished = now()
    entry.status = "finished"
    run.save()
    return entry


def _finish(run: Run) -> None:
    if is_remote(run.paths.root):  # models staged from s3:// (teachers, student inits) on any node
        models = [run.paths.join(e.model) for e in run.manifest.generations if e.model]
        on_every_node(drop_staged, models)
    run.manifest.status = "finished"
    run.manifest.final_model = run.manifest.generations[-1].model
    run.save()
    md, js = render_report(run.manifest.to_json())
    write_bytes_atomic(run.paths.join("report.md"), md.encode())
    write_bytes_atomic(run.paths.join("report.json"), js.encode())
    write_bytes_atomic(run.paths.join("generations.png"), plot_png(run.manifest.to_json()))


def run_generations(cfg: Config, say=print) -> dict[str, Any]:
    """Train (or resume) every generation of ``cfg``; returns the finished manifest as in run.json."""
    k = cfg.method.k
    with open_run(cfg, say) as run:
        for g in range(k):
            if run.manifest.entry(g).status == "finished":
                say(f"[gen {g}] already finished, skipped")
                continue
            teacher = run.paths.model(g - 1) if g > 0 else None
            entry = run_generation(run, g, run.block(g), teacher)
            say(summary_line(entry.model_dump(exclude_none=True), k))
            faults.stop_after_generation(g, k)
        _finish(run)
        return run.manifest.to_json()


def extend_run(run_dir: str, data_path: str, overrides: list[str] | None = None, say=print) -> dict[str, Any]:
    """Train generation k on a new block of data with the run's last model as the teacher."""
    with open_finished(run_dir, overrides or [], say) as run:
        m = run.manifest
        # The new data is checked (labels the model knows, no empty text) before anything changes.
        new_block = read_labelled_file(data_path, run.cfg.data, run.label_names).materialize()
        if new_block.count() == 0:
            raise RunError(f"{data_path!r} holds no rows; nothing to extend with")
        if m.status == "extending":  # an earlier extend was interrupted: finish it
            if m.generations[-1].source != data_path:
                raise RunError(
                    f"run {m.name!r} is still being extended with {m.generations[-1].source!r}; "
                    "run extend with that --data first"
                )
            g = m.generations[-1].index
        else:
            g = len(m.generations)
            m.status = "extending"
            m.entry(g).source = data_path
            run.save()
            remove_tree(run.paths.targets(g))  # leftovers of a crash before run.json knew them
            remove_tree(run.paths.model(g))
        teacher = run.paths.join(m.generations[g - 1].model)
        block = new_block.with_column("block", lit(np.int64(g)))
        entry = run_generation(run, g, block, teacher, extended=True)
        del m.data.block_sizes[g:]  # idempotent when an interrupted extend is finished
        m.data.block_sizes.append(int(entry.block_rows or entry.rows))
        say(summary_line(entry.model_dump(exclude_none=True), g + 1))
        _finish(run)
        return m.to_json()


def evaluate_run(run_dir: str, data_path: str | None = None, all_generations: bool = False):
    """[(generation, metrics)] for the final (or every) model on the holdout or ``data_path``."""
    paths, manifest = read_manifest(run_dir)
    cfg = config_from_dict(manifest.config)
    gens = manifest.finished_generations()
    if not gens:
        raise RunError(f"run {manifest.name!r} has no finished generation yet")
    if data_path:
        ds = read_labelled_file(data_path, cfg.data, manifest.label_names)
    else:
        ds = ray.data.read_parquet(paths.split).filter(expr=col("block") == HOLDOUT)
    ds = ds.materialize()
    on_gpu = cluster_has_gpu(cfg)
    chosen = gens if all_generations else gens[-1:]
    return [(e.index, evaluate_model(ds, paths.join(e.model), cfg, on_gpu)) for e in chosen]
