"""The generation loop (DESIGN.md §1): split once, then score → target → train → evaluate per block.

Everything a run produces lands in its run folder (DESIGN.md §3), and ``run.json`` records each
step as it finishes, so the same command after a crash continues where the last one stopped:
the split is never redone, a scored block is never rescored, a trained model is never retrained.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import Config
from ray.data.expressions import col
from .storage import RunLock, RunPaths, absolute, check_writable, exists, read_json, write_bytes_atomic, write_json_atomic

MANIFEST_VERSION = 1


class RunError(ValueError):
    """The run folder and the request disagree (changed config, unfinished run, ...); one line."""


class StopRequested(RuntimeError):
    """Raised by the ``test_hooks.stop_after_generation`` hook to simulate an interrupted run."""


# Settings that decide what earlier generations contain; changing one of them makes a resumed
# run inconsistent. Everything else (workers, pool sizes, DeepSpeed stage, storage) may change.
RESULT_SETTINGS: dict[str, tuple[str, ...] | None] = {
    "run": ("seed",),
    "data": None,
    "model": ("base", "max_length"),
    "method": None,
    "student": ("init", "epochs", "learning_rate", "weight_decay", "warmup_ratio", "batch_size", "grad_accum"),
    "replay": None,
}


def result_settings(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The flattened ``section.key -> value`` settings that define a run's generations."""
    out: dict[str, Any] = {}
    for section, keys in RESULT_SETTINGS.items():
        values = cfg_dict.get(section, {})
        for key in keys or values.keys():
            out[f"{section}.{key}"] = values.get(key)
    return out


def check_compatible(manifest: dict[str, Any], cfg: Config) -> None:
    old = result_settings(manifest["config"])
    new = result_settings(cfg.to_dict())
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in new if old.get(k) != new.get(k)]
    if changed:
        raise RunError(
            f"run {manifest['name']!r} was started with other settings ({'; '.join(changed)}); "
            "restore them to resume, or choose a new run.name"
        )


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def cluster_has_gpu(cfg: Config) -> bool:
    import ray

    if cfg.cluster.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.cluster.use_gpu)


@dataclass
class Run:
    """A run folder opened for work: config, paths, manifest and where the console goes."""

    cfg: Config
    paths: RunPaths
    manifest: dict[str, Any]
    on_gpu: bool
    say: Callable[[str], None] = print
    _holdout: Any = field(default=None, repr=False)

    @property
    def label_names(self) -> list[str]:
        return self.manifest["label_names"]

    def save(self) -> None:
        write_json_atomic(self.paths.manifest, self.manifest)

    def entry(self, g: int) -> dict[str, Any]:
        gens = self.manifest["generations"]
        while len(gens) <= g:
            gens.append({"index": len(gens), "status": "pending"})
        return gens[g]

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.paths.root) if not "://" in path else path

    def split_dataset(self):
        import ray

        return ray.data.read_parquet(self.paths.split)

    def holdout(self):
        """The holdout rows, read once per run and kept in the object store (every generation
        evaluates on them)."""
        if self._holdout is None:
            self._holdout = self.split_dataset().filter(expr=col("block") == -1).materialize()
        return self._holdout


# ---------------------------------------------------------------------------------------------
# Opening a run


def preflight(cfg: Config) -> str:
    """Checks that cost nothing and would otherwise fail late: model, storage. Returns the base path."""
    from .modeling import check_classifier, resolve_model_path

    base = resolve_model_path(cfg.model.base)
    if "://" not in base:
        check_classifier(base, cfg.model.trust_remote_code)
    check_writable(absolute(cfg.storage.path))
    return base


def _write_split(split, paths: RunPaths) -> dict[str, Any]:
    """Persist the split (temp folder, then rename) so resumes never recompute it."""
    from .storage import remove_tree, rename_tree

    tmp = paths.split + ".tmp"
    remove_tree(tmp)
    split.dataset.write_parquet(tmp)
    rename_tree(tmp, paths.split)
    return {
        "fingerprint": split.fingerprint,
        "block_sizes": list(split.block_sizes),
        "holdout_size": int(split.holdout_size),
        "label_names": list(split.label_names),
    }


def open_run(cfg: Config, say=print) -> tuple[Run, RunLock]:
    """Open (or create) the run folder for ``cfg``; the caller releases the lock.

    Bad input fails before the run folder is created; an existing folder is locked before it is
    read, so a second process on the same run is refused instead of racing the first.
    """
    from .data import split_data

    preflight(cfg)
    paths = RunPaths(absolute(cfg.run_dir))
    lock = RunLock(paths.root).acquire() if exists(paths.root) else None
    try:
        manifest = read_json(paths.manifest) if exists(paths.manifest) else None
        if manifest is not None:
            check_compatible(manifest, cfg)
        if manifest is None or not manifest.get("data", {}).get("split_done"):
            say(f"reading and splitting data ({cfg.data.source}) into k={cfg.method.k} blocks + holdout")
            split = split_data(cfg)  # validates the data: errors surface before anything is written
            if split.holdout_size == 0:
                raise RunError(
                    "no holdout: data.eval_fraction is 0 and data.eval_path is unset, but every generation "
                    "is evaluated on a holdout; set data.eval_fraction (e.g. 0.1) or data.eval_path"
                )
            if lock is None:
                if "://" not in paths.root:
                    os.makedirs(paths.root, exist_ok=True)
                lock = RunLock(paths.root).acquire()
            info = _write_split(split, paths)
            manifest = {
                "version": MANIFEST_VERSION,
                "name": cfg.run.name,
                "run_dir": paths.root,
                "status": "running",
                "created": _now(),
                "config": cfg.to_dict(),
                "label_names": info.pop("label_names"),
                "data": {**info, "split": "split", "split_done": True},
                "generations": [],
            }
        else:
            manifest["config"] = cfg.to_dict()  # resource settings may change between attempts
        run = Run(cfg=cfg, paths=paths, manifest=manifest, on_gpu=cluster_has_gpu(cfg), say=say)
        run.save()
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run, lock


# ---------------------------------------------------------------------------------------------
# One generation


def _replay_rows(run: Run, g: int, block_rows: int):
    """r·|S_g| rows sampled (seeded) from blocks 0..g-1, flagged ``replay``; None when off."""
    r = run.cfg.replay.fraction
    if r <= 0:
        return None
    earlier = sum(run.manifest["data"]["block_sizes"][:g])
    frac = min(1.0, r * block_rows / max(1, earlier))
    seed = run.cfg.run.seed * 1000 + g
    pool = run.split_dataset().filter(expr=(col("block") >= 0) & (col("block") < g))
    return pool.map_batches(_keep_sampled(seed, frac), batch_format="numpy")


def _keep_sampled(seed: int, fraction: float):
    """The rows :func:`incr_ray.data.sample_mask` keeps: a per-row-id hash, so the sample does
    not depend on how Ray Data happens to cut the dataset into blocks."""

    def keep(batch):
        from .data import sample_mask

        mask = sample_mask(batch["row_id"], seed, fraction)
        return {k: v[mask] for k, v in batch.items()}

    return keep


def _flag(ds, replay: bool):
    def add(batch):
        import numpy as np

        batch["replay"] = np.full(len(batch["row_id"]), replay)
        return batch

    return ds.map_batches(add, batch_format="numpy")


def score_generation(run: Run, g: int, block_ds, teacher_model: str) -> int:
    """Teacher outputs + targets for block ``g`` (and replay rows) into gen_g/targets. Returns rows."""
    import ray

    from .storage import remove_tree, rename_tree
    from .teacher import score_block

    entry = run.entry(g)
    block_rows = block_ds.count()
    ds = _flag(block_ds, False)
    replay = _replay_rows(run, g, block_rows)
    if replay is not None:
        ds = ds.union(_flag(replay, True))
    run.say(f"[gen {g}] teacher {run.rel(teacher_model)} scores {block_rows} rows"
            + (" + replay" if replay is not None else ""))
    dest = run.paths.targets(g)
    tmp = dest + ".tmp"
    remove_tree(tmp)
    started = time.perf_counter()
    marker = run.paths.join(".teacher-exit-hook")
    score_block(ds, teacher_model, run.cfg, run.on_gpu, exit_marker=marker).write_parquet(tmp)
    rename_tree(tmp, dest)
    rows = ray.data.read_parquet(dest).count()
    entry.update(targets=run.rel(dest), rows=rows, block_rows=block_rows,
                 replay_rows=rows - block_rows, scoring_seconds=time.perf_counter() - started)
    run.save()
    return rows


def run_generation(run: Run, g: int, block_ds, teacher_model: str | None, extended: bool = False) -> dict[str, Any]:
    """Score (g ≥ 1), train and evaluate generation ``g``; resumes inside the generation too."""
    import ray

    from .student import fit_student
    from .teacher import evaluate_model

    cfg = run.cfg
    entry = run.entry(g)
    if entry.get("status") == "finished":
        return entry
    started = time.perf_counter()
    entry.setdefault("started", _now())
    entry["status"] = "running"
    if extended:
        entry["extended"] = True
    run.save()

    if teacher_model is None:  # generation 0: one-hot labels
        train_ds = block_ds.select_columns(["row_id", "text", "label"])
        rows = entry.get("rows") or train_ds.count()
        entry["rows"] = rows
    else:
        if not entry.get("targets"):
            score_generation(run, g, block_ds, teacher_model)
        rows = entry["rows"]
        train_ds = ray.data.read_parquet(run.paths.join(entry["targets"])).select_columns(
            ["row_id", "text", "label", "target"]
        )

    model_dest = run.paths.model(g)
    holdout = run.holdout()
    if not entry.get("model"):
        init = teacher_model if (teacher_model and cfg.student.init == "previous") else run.manifest["base_model"]
        run.say(f"[gen {g}] training student on {rows} rows from {run.rel(init)} "
                f"({cfg.cluster.workers} worker(s), ZeRO-{cfg.deepspeed.stage}), then evaluating it on the holdout")
        result = fit_student(cfg, g, train_ds, rows, init, run.label_names, model_dest,
                             run.paths.ray_train, run.on_gpu, say=run.say, holdout_ds=holdout)
        metrics = dict(result.metrics)
        entry.update(model=run.rel(model_dest), metrics=metrics.pop("holdout"),
                     eval_seconds=metrics.pop("eval_seconds"), train=metrics)
        run.save()
    if not entry.get("metrics"):  # trained by an earlier attempt that stopped before evaluating
        run.say(f"[gen {g}] evaluating on the holdout")
        evaluating = time.perf_counter()
        entry["metrics"] = evaluate_model(holdout, model_dest, cfg, run.on_gpu)
        entry["eval_seconds"] = time.perf_counter() - evaluating
    entry["seconds"] = entry.get("seconds", 0.0) + time.perf_counter() - started
    entry["finished"] = _now()
    entry["status"] = "finished"
    run.save()
    return entry


def finish(run: Run) -> None:
    from .report import plot_png, render_report

    run.manifest["status"] = "finished"
    run.manifest["final_model"] = run.manifest["generations"][-1]["model"]
    run.save()
    md, js = render_report(run.manifest)
    write_bytes_atomic(run.paths.join("report.md"), md.encode())
    write_bytes_atomic(run.paths.join("report.json"), js.encode())
    write_bytes_atomic(run.paths.join("generations.png"), plot_png(run.manifest))


def run_generations(cfg: Config, say=print) -> dict[str, Any]:
    """Train (or resume) every generation of ``cfg``; returns the finished manifest."""
    from .modeling import resolve_model_path
    from .report import summary_line

    run, lock = open_run(cfg, say)
    try:
        run.manifest["base_model"] = resolve_model_path(cfg.model.base)
        k = cfg.method.k
        split = run.split_dataset()
        for g in range(k):
            entry = run.entry(g)
            if entry.get("status") == "finished":
                say(f"[gen {g}] already finished, skipped")
                continue
            block = split.filter(expr=col("block") == g).materialize()  # counted, then scored
            teacher = run.paths.model(g - 1) if g > 0 else None
            entry = run_generation(run, g, block, teacher)
            say(summary_line(entry, k))
            if cfg.test_hooks.stop_after_generation == g and g < k - 1:
                raise StopRequested(f"stopped after generation {g} (test_hooks.stop_after_generation)")
        finish(run)
        return run.manifest
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# After a run: extend with new data, evaluate


def _open_finished(run_dir: str, overrides: list[str], say) -> tuple[Run, RunLock]:
    from .config import config_from_dict

    paths = RunPaths(absolute(run_dir))
    if not exists(paths.manifest):
        raise RunError(f"{run_dir!r} is not an incr-ray run folder (no run.json); pass --run STORAGE/RUN_NAME")
    manifest = read_json(paths.manifest)
    if manifest.get("status") not in ("finished", "extending"):
        raise RunError(
            f"run {manifest.get('name')!r} is not finished; finish it first with the same `incr-ray train` command"
        )
    cfg = config_from_dict(manifest["config"], overrides)
    check_compatible(manifest, cfg)  # only resource settings may be overridden here
    lock = RunLock(paths.root).acquire()
    return Run(cfg=cfg, paths=paths, manifest=manifest, on_gpu=cluster_has_gpu(cfg), say=say), lock


def extend_run(run_dir: str, data_path: str, overrides: list[str] | None = None, say=print) -> dict[str, Any]:
    """Train generation k on a new block of data with the run's last model as the teacher."""
    from .data import read_labelled_file
    from .report import summary_line
    from .storage import remove_tree

    run, lock = _open_finished(run_dir, overrides or [], say)
    try:
        # The new data is checked (labels the model knows, no empty text) before anything changes.
        new_block = read_labelled_file(data_path, run.cfg.data, run.label_names).materialize()
        if new_block.count() == 0:
            raise RunError(f"{data_path!r} holds no rows; nothing to extend with")
        gens = run.manifest["generations"]
        if run.manifest["status"] == "extending":  # an earlier extend was interrupted: finish it
            if gens[-1].get("source") != data_path:
                raise RunError(
                    f"run {run.manifest['name']!r} is still being extended with {gens[-1].get('source')!r}; "
                    "run extend with that --data first"
                )
            g = gens[-1]["index"]
        else:
            g = len(gens)
            run.manifest["status"] = "extending"
            run.entry(g)["source"] = data_path
            run.save()
            remove_tree(run.paths.targets(g))  # leftovers of a crash before run.json knew them
            remove_tree(run.paths.model(g))
        teacher = run.paths.join(gens[g - 1]["model"])
        block = new_block.map_batches(_set_block(g), batch_format="numpy")
        entry = run_generation(run, g, block, teacher, extended=True)
        sizes = run.manifest["data"]["block_sizes"]
        del sizes[g:]  # idempotent when an interrupted extend is finished
        sizes.append(int(entry.get("block_rows", entry["rows"])))
        say(summary_line(entry, g + 1))
        finish(run)
        return run.manifest
    finally:
        lock.release()


def _set_block(g: int):
    def set_block(batch):
        import numpy as np

        batch["block"] = np.full(len(batch["row_id"]), g, dtype=np.int64)
        return batch

    return set_block


def evaluate_run(run_dir: str, data_path: str | None = None, all_generations: bool = False):
    """[(generation, metrics)] for the final (or every) model on the holdout or ``data_path``."""
    from .config import config_from_dict
    from .data import read_labelled_file
    from .teacher import evaluate_model
    import ray

    paths = RunPaths(absolute(run_dir))
    if not exists(paths.manifest):
        raise RunError(f"{run_dir!r} is not an incr-ray run folder (no run.json); pass --run STORAGE/RUN_NAME")
    manifest = read_json(paths.manifest)
    cfg = config_from_dict(manifest["config"])
    gens = [g for g in manifest["generations"] if g.get("status") == "finished"]
    if not gens:
        raise RunError(f"run {manifest['name']!r} has no finished generation yet")
    if data_path:
        ds = read_labelled_file(data_path, cfg.data, manifest["label_names"])
    else:
        ds = ray.data.read_parquet(paths.split).filter(expr=col("block") == -1)
    ds = ds.materialize()
    on_gpu = cluster_has_gpu(cfg)
    chosen = gens if all_generations else gens[-1:]
    return [(g["index"], evaluate_model(ds, paths.join(g["model"]), cfg, on_gpu)) for g in chosen]
