"""Which training rows each Ray Train worker reads, and in which batches: fixed by the rows, the
seed and the number of workers, so that a run is reproducible and a resumed run skips exactly the
batches each rank trained before its checkpoint.

Ray Train's own ``DataConfig`` gives each worker a ``streaming_split`` of the training rows, which
deals blocks to whichever worker asks first: rows moved between ranks from run to run, and after a
restart a rank skipped its first N batches of another stream than the one it had trained. Here
rank ``r`` of ``w`` reads the ``r``-th of ``w`` equal runs of the seeded training order
(:func:`rank_rows`, the last ``rows % w`` rows left out and recorded), and its stream is that run
cut into batches from its start, pass after pass, exactly ``max_steps × grad_accum`` batches in all
(:class:`RankStream`): the Hugging Face Trainer sees one epoch, which a resume fast-forwards by the
batches it trained, whatever pass it stopped in.

The rows are cut where the ranks' runs meet on the driver (:func:`cut_for_ranks`), where tasks
can run; :class:`RankShards` then hands each rank its run without a task, because the workers may
hold every CPU of the cluster by the time it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ray.train import DataConfig

TRAIN = "train"
BALANCED = "balanced"  # balanced fine-tuning's rows (student.balanced_epochs), split over the ranks like TRAIN's


def rank_rows(rows: int, world: int) -> list[range]:
    """The positions, in the seeded training order of ``rows`` rows, that each of ``world`` ranks
    trains: equal runs, one after the other. The last ``rows % world`` rows are left out, so every
    rank takes the same number of optimizer steps over the same number of rows."""
    if rows < world:
        raise ValueError(f"{rows} training row(s) cannot be shared by {world} workers: lower cluster.workers")
    each = rows // world
    return [range(r * each, (r + 1) * each) for r in range(world)]


def stream_batches(rows: int, batch_size: int, total: int) -> list[range]:
    """The positions within a rank's run of ``rows`` rows that each batch of its stream reads: the
    run cut into ``batch_size`` rows from its start (the last batch of a pass shorter), pass after
    pass, ``total`` batches in all (the last pass cut short). What :class:`RankStream` yields over
    Ray Data's batches, written out."""
    if rows < 1:
        return []
    one_pass = [range(i, min(i + batch_size, rows)) for i in range(0, rows, batch_size)]
    return [one_pass[i % len(one_pass)] for i in range(total)]


class RankStream:
    """A rank's training batches for one generation: ``one_pass()`` (one pass over the rank's run,
    in batches) again and again, ``total`` batches in all. Each iteration starts again from the
    first batch of the first pass, as a resumed Trainer's fast-forward expects."""

    def __init__(self, one_pass: Callable[[], Iterable[Any]], total: int):
        self.one_pass, self.total = one_pass, total

    def __iter__(self) -> Iterator[Any]:
        given = 0
        while given < self.total:
            before = given
            for batch in self.one_pass():
                yield batch
                given += 1
                if given == self.total:
                    return
            if given == before:  # an empty run: no pass would ever give a batch
                return


class StreamThen:
    """One stream after another, each iteration from the start of the first: a rank's main
    training batches, then balanced fine-tuning's (the Trainer sees one epoch of both, which a
    resume fast-forwards as it does one stream)."""

    def __init__(self, *streams: Iterable[Any]):
        self.streams = streams

    def __iter__(self) -> Iterator[Any]:
        for stream in self.streams:
            yield from stream


def cut_for_ranks(ds, world: int):
    """``ds`` (materialized, in training order) without its last ``rows % world`` rows, its blocks
    cut where the ranks' runs meet, so that :class:`RankShards` splits it without a task. Returns
    the dataset and the number of rows left out."""
    import ray

    rows = ds.count()
    runs = rank_rows(rows, world)
    parts = ds.split_at_indices([run.stop for run in runs])[:world]  # the last part: the rows left out
    refs = [ref for part in parts for bundle in part.iter_internal_ref_bundles() for ref in bundle.block_refs]
    return ray.data.from_arrow_refs(refs), rows - runs[-1].stop


class RankShards(DataConfig):
    """Ray Train's dataset assignment with the training rows (and balanced fine-tuning's, each a
    dataset of ``split``) split by :func:`rank_rows` (rank ``r`` reads the ``r``-th run of
    :func:`cut_for_ranks`'s dataset, in order); every other dataset is read whole by every worker,
    as Ray Train's own config does for datasets it does not split."""

    def __init__(self, *split: str):
        split = split or (TRAIN,)
        super().__init__(datasets_to_split=list(split))
        self.split = split

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        others = {name: ds for name, ds in datasets.items() if name not in self.split}
        out = (super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs) if others
               else [{} for _ in range(world_size)])
        for name in (n for n in self.split if n in datasets):
            ds = datasets[name]
            # At block boundaries once cut_for_ranks has cut them: no task, which might wait
            # forever for a CPU the workers hold.
            parts = ds.split_at_indices([run.stop for run in rank_rows(ds.count(), world_size)])
            for rank in range(world_size):
                part = parts[rank]
                part.context.execution_options = self._resolve_execution_options(name)
                part.context.execution_options.preserve_order = True
                out[rank][name] = part.iterator()
        return out
