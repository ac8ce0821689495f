"""A generation's training rows and their targets: block ``g``, plus the rows of earlier blocks it
replays (``replay.fraction``, or the memory of ``replay.per_class``), scored by the teacher — one
generation or the mean of an ensemble's — into ``gen_<g>/targets`` (:func:`score_generation`), or
taken as they are when every target is one-hot (:func:`one_hot_generation`). The teacher's figures
on its block, the suspected label errors and the memory are recorded with the targets.
"""

from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager

import ray
import ray.data
from ray.data.expressions import col, lit

from ..config import ConfigError
from ..data import memory_candidates, replay_rows, rows_with_ids, training_part
from ..data.errors import exception_chain
from ..generation.progress import ScoringProgress
from ..generation.teacher import score_block, teacher_block_stats
from ..modeling import NonFiniteError
from ..storage import remove_tree, rename_tree
from .folder import Run
from .manifest import GenerationEntry
from .memory import herd, keep_memory, uniform_ranks, write_memory
from .report import ensemble_said
from .suspects import record_suspects


# Errors a Ray worker or actor can only find there (its GPU's bf16 support, NaN in its forward)
# that the user can fix: they reach the console as their own one line, not in Ray's wrappers.
WORKER_USER_ERRORS = (NonFiniteError, ConfigError)


@contextmanager
def worker_failures_reported(say):
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


@contextmanager
def _scoring_progress(run: Run, g: int, ds):
    """(the rows to score, a queue actor counting them — None on a terminal, where Ray Data's
    progress bars show the scoring)."""
    if sys.stdout.isatty():
        yield ds, None
        return
    ds = ds.materialize()  # score_block would read it first anyway; here it also gives the count
    with ScoringProgress(run.say, ds.count(), f"[gen {g}] teacher scored") as progress:
        yield ds, progress.actor


def _with_replay(run: Run, g: int, block_ds, block_rows: int):
    """(block ``g``'s rows with ``replay`` false, and with rows of the blocks trained before it with
    ``replay`` true — ``replay.fraction`` of the block sampled, or the memory's candidates; whether
    any were added; the candidates, for ``replay.per_class``: ``row_id``, ``label``, ``block``)."""
    cfg = run.cfg
    ds = block_ds.with_column("replay", lit(False))
    trained_before = training_part(run.split_dataset(), cfg.run.seed, cfg.method.validation_fraction)
    candidates = None
    if cfg.replay.memory:
        r = cfg.replay
        candidates = memory_candidates(run.paths.split, g, r.per_class if r.selection == "uniform" else
                                       r.candidates_per_class, cfg.run.seed, cfg.method.validation_fraction)
        earlier = trained_before.filter(expr=(col("block") >= 0) & (col("block") < g))
        replay = rows_with_ids(earlier, candidates["row_id"]) if len(candidates["row_id"]) else None
    else:
        replay = replay_rows(trained_before, g, block_rows, cfg.replay.fraction, run.manifest.data.block_sizes,
                             cfg.run.seed)
    if replay is None:
        return ds, False, candidates
    return ds.union(replay.with_column("replay", lit(True))), True, candidates


def _uniform_memory(run: Run, g: int, entry: GenerationEntry, candidates) -> None:
    """``replay.selection: uniform`` with ``replay.per_class``: the candidates are the memory."""
    if candidates is not None:
        picks = {**candidates, "rank": uniform_ranks(candidates["row_id"], candidates["label"], run.cfg.run.seed)}
        write_memory(run, g, entry, picks, len(candidates["row_id"]))


def one_hot_generation(run: Run, g: int, block_ds):
    """The rows of a generation whose targets are all one-hot (``method.threshold: 1``): block and
    replay rows as they are, no teacher scoring — the labels are the targets."""
    entry = run.manifest.entry(g)
    block_rows = entry.block_rows or block_ds.count()
    ds, replayed, candidates = _with_replay(run, g, block_ds, block_rows)
    ds = ds.select_columns(["row_id", "text", "label"])
    if not entry.rows:
        run.say(f"[gen {g}] no teacher scoring: at method.threshold 1 every target is the one-hot label")
        entry.rows, entry.block_rows = (ds.count() if replayed else block_rows), block_rows
        entry.replay_rows = entry.rows - block_rows
        _uniform_memory(run, g, entry, candidates)
        run.save()
    return ds


def score_generation(run: Run, g: int, block_ds, members: list[GenerationEntry]) -> int:
    """Teacher outputs + targets for block ``g`` (and replay rows) into gen_g/targets, and what the
    teacher and the target rule did on the block's own rows (``teacher_on_block``). Returns rows.
    ``members``: the generations that teach (:meth:`Manifest.teacher_members`, oldest first; one
    unless ``teacher.ensemble`` > 1), recorded as ``ensemble`` with the targets.

    Targets already recorded in run.json are never rescored: a run scored by an earlier attempt
    (or an older incr-ray) only gets its missing ``teacher_on_block`` from them.
    """
    entry = run.manifest.entry(g)
    if not entry.targets:
        block_rows = block_ds.count()
        ds, replayed, candidates = _with_replay(run, g, block_ds, block_rows)
        herding = run.cfg.replay.selection == "herding" and replayed
        who = (f"teacher {run.rel(run.paths.join(members[0].model))}" if run.cfg.teacher.ensemble == 1
               else ensemble_said([e.index for e in members], run.cfg.teacher.ensemble))
        run.say(f"[gen {g}] {who} scores {block_rows} rows"
                + (f" + {len(candidates['row_id'])} memory candidates" if herding else " + replay" if replayed else ""))
        dest = run.paths.targets(g)
        tmp, scored = dest + ".tmp", dest + ".scored"
        remove_tree(tmp)
        remove_tree(scored)
        started = time.perf_counter()
        with worker_failures_reported(run.say), _scoring_progress(run, g, ds) as (ds, progress):
            score_block(ds, [run.paths.join(e.model) for e in members], run.cfg, run.on_gpu, progress=progress,
                        num_classes=len(run.manifest.label_names_of(g)), features=herding,
                        ).write_parquet(scored if herding else tmp)
        if herding:  # the teacher's features of the candidates, scored with the block: the memory, then its rows
            picks, scored_candidates = herd(scored, run.cfg.replay.per_class)
            ray.data.read_parquet(scored).map_batches(keep_memory, batch_format="pyarrow",
                                                      fn_kwargs={"ids": picks["row_id"]}).write_parquet(tmp)
            remove_tree(scored)
        rename_tree(tmp, dest)
        rows = ray.data.read_parquet(dest).count()
        if run.cfg.teacher.ensemble > 1:
            entry.ensemble = [e.index for e in members]
        if herding:
            write_memory(run, g, entry, picks, scored_candidates)
        else:
            _uniform_memory(run, g, entry, candidates)
        entry.targets, entry.rows, entry.block_rows = run.rel(dest), rows, block_rows
        entry.replay_rows, entry.scoring_seconds = rows - block_rows, time.perf_counter() - started
    if entry.teacher_on_block is None:
        # Saved together with the targets above, so a recorded scoring always has its figures.
        entry.teacher_on_block = teacher_block_stats(run.paths.join(entry.targets), run.cfg)
        t = entry.teacher_on_block
        if t:
            run.say(f"[gen {g}] teacher on its block: acc {t['accuracy']:.4f}, NLL {t['nll']:.4f}; "
                    f"targets kept {100 * t['kept']:.1f}%, pushed {100 * t['pushed']:.1f}%, "
                    f"floored {100 * t['floored']:.1f}%, mean entropy {t['target_entropy']:.3f} nats")
    if entry.suspects is None and run.cfg.method.suspect_below > 0:
        record_suspects(run, g, entry)
    run.save()
    return entry.rows
