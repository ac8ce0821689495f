"""The generation loop: split once, then score → target → train → evaluate, block by block.

Everything a run produces lands in its run folder, and ``run.json`` records each step as it
finishes, so the same command after a crash continues where the last one stopped: the split is
never redone, a scored block is never rescored, a trained model is never retrained.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
import ray.data
from ray.data.expressions import col, lit

from .. import faults
from ..config import Config, config_from_dict
from ..data import (HOLDOUT, extension_holdout_parts, read_labelled_file, read_new_block, retention_sample,
                    training_part, validation_part)
from ..generation.evaluation import evaluate_model, read_predictions, write_predictions
from ..generation.student import StudentRequest, fit_student
from ..generation.trainer import generation_steps, planned_steps, run_lr_window
from ..method.metrics import flip_rates, probs_metrics
from ..method.targets import softmax
from ..resolve import probe_cluster, resolve
from ..storage import remove_tree, rename_tree
from .folder import Run, RunLock, finish_run, open_finished, open_run, read_manifest
from .manifest import GenerationEntry, RunError, as_sets, extension_settings, now, result_settings
from .balanced import balanced_line, balanced_set
from .model_card import write_model_card
from .new_classes import check_new_labels, initial_model, new_labels_line, old_new_figures, old_new_lines
from .record import continual_record, ewc_without_anchor_line, record_fit
from .scoring import one_hot_generation, score_generation, worker_failures_reported
from .report import summary_line
from .suspects import training_rows
from .tracking import tracked


# Fewer optimizer steps than this in a generation get a warning: a pretrained model hardly moves.
FEW_STEPS = 30


def _teacher_on_validation(run: Run, entry: GenerationEntry) -> dict[str, float]:
    """The teacher's metrics on the validation slice, from its stored probabilities (no scoring)."""
    cfg = run.cfg
    table = validation_part(ray.data.read_parquet(run.paths.join(entry.targets)), cfg.run.seed,
                            cfg.method.validation_fraction).select_columns(["label", "teacher_probs", "replay"]).to_pandas()
    table = table[~table["replay"].astype(bool)]
    if len(table) == 0:
        return {}
    probs = np.stack(table["teacher_probs"].to_numpy()).astype(np.float64)
    # Stored at temperature τ: undo it for NLL (softmax(log q · τ) is the τ = 1 distribution).
    if cfg.method.temperature != 1.0:
        probs = softmax(np.log(np.maximum(probs, 1e-300)) * cfg.method.temperature)
    m = probs_metrics(probs, table["label"].to_numpy().astype(np.int64), cfg.eval.ece_bins)
    return {"teacher_accuracy": m["accuracy"], "teacher_nll": m["nll"]}


def _student_slices(run: Run, g: int, rows_ds, block_ds):
    """(training rows, validation slice, retention sample) of generation ``g``; the last two None when off."""
    cfg = run.cfg
    seed, fraction = cfg.run.seed, cfg.method.validation_fraction
    columns = ["row_id", "text", "label"]
    train_ds = training_part(rows_ds, seed, fraction)
    validation_ds = validation_part(block_ds, seed, fraction).select_columns(columns) if fraction > 0 else None
    retention_ds = retention_sample(run.split_dataset(), g, cfg.eval.retention_rows, run.manifest.data.block_sizes,
                                    seed, fraction)
    return train_ds, validation_ds, retention_ds.select_columns(columns) if retention_ds is not None else None


def _gate(run: Run, g: int, entry: GenerationEntry, teacher: GenerationEntry | None) -> bool:
    """method.keep_best: is the student at least as good as its teacher on the validation slice?"""
    v = entry.validation or {}
    if not run.cfg.method.keep_best or teacher is None or "teacher_accuracy" not in v:
        return True
    better = (v["accuracy"], -v["nll"]) >= (v["teacher_accuracy"], -v["teacher_nll"])
    if not better:
        # With teacher.ensemble the teacher's figures are the ensemble's (its stored probabilities).
        mean = entry.ensemble is not None and len(entry.ensemble) > 1
        whose = f" (the mean of generations {', '.join(map(str, entry.ensemble))})" if mean else ""
        stays = "the final model and the newest member of the teacher" if mean else "the teacher and the final model"
        run.say(f"[gen {g}] not promoted: on the validation slice accuracy {v['accuracy']:.4f}, NLL {v['nll']:.4f} "
                f"against its teacher's{whose} {v['teacher_accuracy']:.4f}, {v['teacher_nll']:.4f} (accuracy decides, "
                f"NLL breaks a tie); generation {teacher.index} stays {stays} (method.keep_best)")
    return better


def _flip_rates(run: Run, entry: GenerationEntry, teacher: GenerationEntry | None) -> dict[str, float] | None:
    """Flip and fix rates of ``entry`` against its teacher on the holdout, from both predictions files."""
    if teacher is None or not teacher.predictions or not entry.predictions:
        return None
    holdout = run.holdout().select_columns(["row_id", "label"]).to_pandas()
    return flip_rates(read_predictions(run.paths.join(teacher.predictions)),
                      read_predictions(run.paths.join(entry.predictions)),
                      (holdout["row_id"].to_numpy(), holdout["label"].to_numpy()))


def run_generation(run: Run, g: int, block_ds, teacher: GenerationEntry | None, extended: bool = False) -> GenerationEntry:
    """Score (g ≥ 1), train and evaluate generation ``g`` with ``teacher`` (None: generation 0, one-hot);
    resumes inside the generation too."""
    cfg = run.cfg
    entry = run.manifest.entry(g)
    if entry.status == "finished":
        return entry
    started = time.perf_counter()
    entry.started = entry.started or now()
    entry.status = "running"
    if extended:
        entry.extended = True
    run.tracker.generation_started(entry, teacher)  # its nested run (new, or the one an earlier attempt opened)
    run.save()

    # Targets: one-hot labels for generation 0, the teacher's corrected distribution after it.
    teacher_model = run.paths.join(teacher.model) if teacher is not None else None
    if teacher_model is None:
        rows_ds = block_ds.select_columns(["row_id", "text", "label"])
        entry.rows = entry.rows or rows_ds.count()
    elif not cfg.method.needs_teacher:
        rows_ds = one_hot_generation(run, g, block_ds)
    else:
        score_generation(run, g, block_ds, run.manifest.teacher_members(g, cfg.teacher.ensemble))
        lever = cfg.method.suspects != "keep"
        rows_ds = ray.data.read_parquet(run.paths.join(entry.targets)).select_columns(
            ["row_id", "text", "label", "target"] + (["teacher_probs", "replay"] if lever else []))
        if lever:  # the stored targets stay the rule's; the student reads them with the lever applied
            rows_ds = rows_ds.map_batches(training_rows(cfg, len(run.manifest.teacher_labels(g))),
                                          batch_format="pyarrow")
    train_ds, validation_ds, retention_ds = _student_slices(run, g, rows_ds, block_ds)

    # Train, then evaluate in the same workers.
    model_dest = run.paths.model(g)
    if not entry.model:
        init = (initial_model(run, g, teacher_model) if (teacher_model and cfg.student.init == "previous")
                else run.base_model)
        train_rows = (train_ds.count() if validation_ds is not None or cfg.method.suspects == "drop"
                      else entry.rows)
        steps = generation_steps(cfg, train_rows)
        run.say(f"[gen {g}] training student on {train_rows} rows from {run.rel(init)} "
                f"({cfg.cluster.workers} worker(s), ZeRO-{cfg.deepspeed.stage}, {steps} optimizer steps), "
                "then evaluating it on the holdout")
        if steps < FEW_STEPS:
            run.say(f"[gen {g}] warning: {steps} optimizer steps can hardly move a pretrained model; raise "
                    "student.min_steps or student.epochs, or lower student.batch_size")
        no_anchor = ewc_without_anchor_line(g, cfg.method.ewc, teacher)
        if no_anchor:
            run.say(no_anchor)
        balanced, balanced_ds = balanced_set(cfg, g, train_ds) or (None, None)
        if balanced is not None:
            run.say(balanced_line(g, balanced, cfg))
        classes = len(run.manifest.label_names_of(0))  # the run's own, which replay.per_class is planned for
        lr_window = (run_lr_window(cfg, run.manifest.data.block_sizes, g, classes) if cfg.student.schedule == "run"
                     else None)
        request = StudentRequest(generation=g, init_model=init, label_names=run.manifest.label_names_of(g),
                                 rows=train_rows,
                                 model_dest=model_dest, ray_storage=run.paths.ray_train,
                                 predictions_dest=run.paths.predictions(g), lr_window=lr_window,
                                 later_steps=sum(planned_steps(cfg, run.manifest.data.block_sizes, classes)[g + 1:]),
                                 progress_dest=run.paths.progress(g),
                                 adapter_dest=run.paths.adapter(g) if cfg.student.lora.r else None,
                                 fisher_dest=run.paths.fisher(g) if cfg.method.ewc else None,
                                 ewc_anchor=(run.paths.join(teacher.fisher) if cfg.method.ewc and teacher
                                             and teacher.fisher else None),
                                 run_manifest=run.paths.manifest, **run.tracker.worker_fields(g),
                                 **(dict(balanced_rows=balanced.rows, balanced_per_class=balanced.per_class,
                                         balanced_steps=balanced.steps) if balanced is not None else {}))
        extension_holdouts = {e.index: ray.data.read_parquet(run.paths.join(e.own_holdout))
                              for e in run.manifest.generations[:g + 1] if e.own_holdout}
        with worker_failures_reported(run.say):
            train = fit_student(cfg, request, train_ds, run.on_gpu, holdout_ds=run.holdout(), say=run.say,
                                validation_ds=validation_ds, retention_ds=retention_ds,
                                extension_holdouts=extension_holdouts, balanced_ds=balanced_ds)
        entry.predictions = run.rel(run.paths.predictions(g))
        on_validation = (_teacher_on_validation(run, entry)
                         if teacher and entry.targets and train.get("validation") is not None else None)
        for line in record_fit(entry, train, teacher, on_validation, _flip_rates(run, entry, teacher)):
            run.say(line)
        entry.old_new = old_new_figures(run, g, teacher, train.get("class_counts"))
        entry.promoted = _gate(run, g, entry, teacher)
        entry.model = run.rel(model_dest)
        entry.adapter = run.rel(request.adapter_dest) if request.adapter_dest else None
        entry.fisher = run.rel(request.fisher_dest) if request.fisher_dest else None
        run.save()
    if not entry.metrics:  # trained by an earlier attempt that stopped before evaluating
        run.say(f"[gen {g}] evaluating on the holdout")
        evaluating = time.perf_counter()
        entry.metrics, predictions = evaluate_model(run.holdout(), model_dest, cfg, run.on_gpu, predictions=True)
        write_predictions(run.paths.predictions(g), *predictions)
        entry.predictions = run.rel(run.paths.predictions(g))
        entry.continual, said = continual_record(g, teacher, _flip_rates(run, entry, teacher), None)
        for line in said:
            run.say(line)
        entry.old_new = old_new_figures(run, g, teacher, None)  # the run's holdout only: drift was not measured
        entry.eval_seconds = time.perf_counter() - evaluating
    # The folder is complete (temperature folded in, gate decided): its card goes in before the
    # generation counts as finished, so a resumed run never skips a generation without one.
    write_model_card(model_dest, run.manifest, g)
    entry.seconds = (entry.seconds or 0.0) + time.perf_counter() - started
    entry.finished = now()
    entry.status = "finished"
    run.save()
    run.tracker.generation_finished(entry)
    return entry


def run_generations(cfg: Config, say=print, lock: RunLock | None = None) -> dict[str, Any]:
    """Train (or resume) every generation of ``cfg``; returns the finished manifest as in run.json.
    ``lock``: the run folder's lock when the caller took it already (``folder.claim_run``)."""
    k = cfg.method.k
    with open_run(cfg, say, lock=lock) as run, tracked(run):
        for g in range(k):
            if run.manifest.entry(g).status == "finished":
                say(f"[gen {g}] already finished, skipped")
                continue
            entry = run_generation(run, g, run.block(g), run.manifest.teacher_of(g))
            say(summary_line(entry.model_dump(exclude_none=True), k))
            faults.stop_after_generation(g, k)
        finish_run(run)
        return run.manifest.to_json()


def _carve_own_holdout(run: Run, g: int, new_block):
    """extend --holdout-fraction: the new data's rows to train on; its own holdout goes to
    gen_<g>/own_holdout (once: a resumed extension reads it back)."""
    entry = run.manifest.entry(g)
    fraction = entry.own_holdout_fraction or 0.0
    if fraction <= 0:
        return new_block
    train_part, held_out = extension_holdout_parts(new_block, run.cfg.run.seed, fraction)
    if not entry.own_holdout:
        rows = held_out.count()
        if rows == 0 or rows == new_block.count():
            raise RunError(f"--holdout-fraction {fraction} leaves {'no' if rows == 0 else 'every'} row of "
                           f"{entry.source!r} held out; choose a share that splits it")
        dest = run.paths.own_holdout(g)
        remove_tree(dest + ".tmp")
        held_out.write_parquet(dest + ".tmp")
        rename_tree(dest + ".tmp", dest)
        entry.own_holdout, entry.own_holdout_rows = run.rel(dest), rows
        run.save()
        run.say(f"[gen {g}] held out {rows} rows of the new data as its own holdout")
    return train_part.materialize()


def extend_run(run_dir: str, data_path: str, overrides: list[str] | None = None, say=print,
               holdout_fraction: float = 0.0, lock: RunLock | None = None,
               allow_new_labels: bool = False) -> dict[str, Any]:
    """Train generation k on a new block of data with the run's last model as the teacher; with
    ``holdout_fraction``, part of the new data is held out as its own holdout first. ``lock``: the
    run folder's lock when the caller took it already (``folder.claim_finished``).
    ``allow_new_labels``: labels the run has never seen become new classes (appended to the label
    map, the head grown); without, they are refused."""
    with open_finished(run_dir, overrides or [], say, lock=lock) as run, tracked(run):
        m = run.manifest
        # The new data is checked (labels known or added, no empty text) before anything changes.
        new_block, names = read_new_block(data_path, run.cfg.data, run.label_names, allow_new_labels)
        new_block = new_block.materialize()
        if new_block.count() == 0:
            raise RunError(f"{data_path!r} holds no rows; nothing to extend with")
        check_new_labels(run.cfg, run.base_model, run.label_names, names)
        settings = extension_settings(m, run.cfg)
        resumed = m.status == "extending"
        g = m.begin_extension(data_path, holdout_fraction, settings, names)
        if not resumed:
            run.save()
            for leftover in (run.paths.targets(g), run.paths.model(g), run.paths.adapter(g), run.paths.own_holdout(g),
                             run.paths.initial_model(g)):
                remove_tree(leftover)  # of a crash before run.json knew them
        if m.entry(g).new_labels:
            say(new_labels_line(m, g))
        if settings:
            own = result_settings(m.config)
            say(f"generation {g} trains with {as_sets(settings)} (the run's: {as_sets({k: own[k] for k in settings})})")
        teacher = m.teacher_of(g)
        block = _carve_own_holdout(run, g, new_block).with_column("block", lit(np.int64(g)))
        entry = run_generation(run, g, block, teacher, extended=True)
        del m.data.block_sizes[g:]  # idempotent when an interrupted extend is finished
        m.data.block_sizes.append(int(entry.block_rows or entry.rows))
        say(summary_line(entry.model_dump(exclude_none=True), g + 1))
        _say_extension(say, teacher, entry)
        for line in old_new_lines(g, entry.old_new, m.label_names_of(g)):
            say(line)
        finish_run(run)
        return m.to_json()


def _say_extension(say, before: GenerationEntry, after: GenerationEntry) -> None:
    """What the extension did to the final model on the holdout, and a warning when it got worse."""
    a, b = before.metrics["accuracy"], after.metrics["accuracy"]
    say(f"extension: holdout accuracy {a:.4f} (gen {before.index}) → {b:.4f} (gen {after.index}), "
        f"{100 * (b - a):+.1f} points")
    if after.promoted is False:
        say(f"generation {after.index} was not promoted (worse than its teacher on the validation slice: accuracy, "
            f"then NLL), so the final model stays generation {before.index} at holdout accuracy {a:.4f}")
    elif b < a:
        say(f"warning: generation {after.index} is {100 * (a - b):.1f} points less accurate on the holdout than "
            f"generation {before.index} and is now the final model; an extension with --set student.schedule=run "
            "trains at 10% of the peak learning rate and moves the model less, and in a run with "
            "method.validation_fraction and method.keep_best a student worse than its teacher is not promoted")


def evaluate_run(run_dir: str, data_path: str | None = None, all_generations: bool = False, say=print):
    """[(generation, metrics)] for the final (or every) model on the holdout or ``data_path``.

    The final model is ``final_generation`` (the gate may have kept an earlier one), else the last
    promoted generation. A generation from before an extension added labels knows fewer classes
    than the run's label map: it is scored on its own head, and a row of a class it does not know
    counts as wrong for it (its probability is 0), which ``say`` tells."""
    paths, manifest = read_manifest(run_dir)
    cfg = resolve(config_from_dict(manifest.config), probe_cluster())
    gens = manifest.finished_generations()
    if not gens:
        raise RunError(f"run {manifest.name!r} has no finished generation yet")
    names = manifest.label_names
    if data_path:
        ds = read_labelled_file(data_path, cfg.data, names)
    else:
        ds = ray.data.read_parquet(paths.split).filter(expr=col("block") == HOLDOUT)
    ds = ds.materialize()
    final = manifest.final_generation
    final = final if final is not None else (manifest.teacher_of(len(manifest.generations)) or gens[-1]).index
    chosen = gens if all_generations else [e for e in gens if e.index == final]
    out = []
    for e in chosen:
        known = len(manifest.label_names_of(e.index))
        unknown = ds.filter(expr=col("label") >= known).count() if known < len(names) else 0
        if unknown:
            say(f"gen {e.index} knows {known} of the run's {len(names)} labels: its {unknown} row(s) of "
                f"{', '.join(names[known:])} count as wrong")
        out.append((e.index, evaluate_model(ds, paths.join(e.model), cfg, cfg.cluster.use_gpu, num_classes=len(names))))
    return out
