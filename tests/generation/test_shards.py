"""Which training rows each rank reads, in which batches (incr_ray.generation.shards): the pure
assignment below Ray, then the Ray Train data config on the session's Ray. That a resumed 2-worker
generation trains each row once rides on R3 (tests/run/test_faults_e2e.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from incr_ray.generation.shards import RankStream, StreamThen, rank_rows, stream_batches


@given(rows=st.integers(1, 5000), world=st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_ranks_get_equal_disjoint_runs_and_the_remainder_is_left_out(rows, world):
    if rows < world:
        with pytest.raises(ValueError, match=f"{rows} training row.*{world} workers: lower cluster.workers"):
            rank_rows(rows, world)
        return
    runs = rank_rows(rows, world)
    assert len(runs) == world and len({len(r) for r in runs}) == 1
    assert [i for run in runs for i in run] == list(range(rows - rows % world))  # in order, once each


def test_a_stream_cuts_each_pass_from_its_start_and_stops_at_the_steps():
    # 10 rows, batches of 4, 7 batches: passes of 4+4+2 rows; the third pass cut short.
    assert [(b.start, b.stop) for b in stream_batches(10, 4, 7)] == [
        (0, 4), (4, 8), (8, 10), (0, 4), (4, 8), (8, 10), (0, 4)]
    assert stream_batches(10, 4, 2) == [range(0, 4), range(4, 8)]  # max_steps below one pass
    assert stream_batches(0, 4, 3) == []


@given(rows=st.integers(0, 60), batch_size=st.integers(1, 9), total=st.integers(0, 40), skip=st.integers(0, 40))
@settings(max_examples=200, deadline=None)
def test_rank_stream_yields_the_written_out_batches_and_a_fast_forward_continues_it(rows, batch_size, total, skip):
    """RankStream over a pass of batches is stream_batches; each iteration starts from the first
    batch (the Trainer's fast-forward on resume skips into it), and an empty run gives nothing."""
    passes = []

    def one_pass():
        passes.append(1)
        return [range(i, min(i + batch_size, rows)) for i in range(0, rows, batch_size)]

    stream = RankStream(one_pass, total)
    first = list(stream)
    assert first == stream_batches(rows, batch_size, total)
    resumed = list(stream)[skip:]
    assert first[:skip] + resumed == first  # skip k, train the rest: each batch once


def test_balanced_fine_tunings_batches_follow_the_main_ones_and_a_resume_skips_into_either():
    main = RankStream(lambda: [("main", i) for i in range(3)], total=5)
    balanced = RankStream(lambda: [("balanced", i) for i in range(2)], total=3)
    stream = StreamThen(main, balanced)
    first = list(stream)
    assert first == [("main", 0), ("main", 1), ("main", 2), ("main", 0), ("main", 1),
                     ("balanced", 0), ("balanced", 1), ("balanced", 0)]
    for skip in range(len(first) + 1):
        assert first[:skip] + list(stream)[skip:] == first  # each iteration from the start


# ---------------------------------------------------------------------------------------------
# On the session's Ray


def _ordered(ray, rows, blocks, reverse=False):
    from incr_ray.generation.student import shuffled_for_training

    items = [{"row_id": i, "text": f"row {i}", "label": i % 3} for i in range(rows)]
    return shuffled_for_training(ray.data.from_items(items[::-1] if reverse else items, override_num_blocks=blocks),
                                 seed=7, rows=rows)


def _rank_batches(ray, ordered, world, batch_size, total):
    """Each rank's row ids per batch, as a worker reads them, configured while the workers (here a
    placement group) hold every CPU of the session's 2-CPU Ray: a task would wait for ever."""
    import threading

    from incr_ray.generation.shards import RankShards, cut_for_ranks

    cut, left_out = cut_for_ranks(ordered, world)
    holdout = ordered.limit(5).materialize()
    pg = ray.util.placement_group([{"CPU": 1}] * 2)
    ray.get(pg.ready())
    got = {}

    def read():
        shards = RankShards().configure({"train": cut, "holdout": holdout}, world, None, ["node"] * world)
        got["train"] = [[b["row_id"].tolist() for b in RankStream(
            lambda it=rank["train"]: it.iter_batches(batch_size=batch_size, batch_format="numpy"), total)]
            for rank in shards]
        got["holdout"] = [[r["row_id"] for r in rank["holdout"].iter_rows()] for rank in shards]

    try:
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(60)
        assert not reader.is_alive(), "RankShards waited for a CPU the training workers hold"
    finally:
        ray.util.remove_placement_group(pg)
    return got, left_out


def test_each_rank_reads_the_same_rows_in_the_same_batches_every_time(ray_local):
    """Two calls, the rows arriving in other blocks in another order (as a teacher pool's output
    does between runs): every rank gets the same rows in the same batches, its own run of the
    seeded order, cut from its start each pass; the remainder is left out; the evaluation slice
    goes whole to every rank."""
    ray = ray_local
    first = _ordered(ray, 601, 4)
    order = [r["row_id"] for r in first.take_all()]
    got, left_out = _rank_batches(ray, first, 2, 16, 25)  # 300 rows a rank: passes of 19 batches, 6 of the next
    again, _ = _rank_batches(ray, _ordered(ray, 601, 7, reverse=True), 2, 16, 25)
    assert got == again and left_out == 1
    for rank, batches in enumerate(got["train"]):
        run = order[300 * rank:300 * (rank + 1)]
        assert batches == [[run[i] for i in b] for b in stream_batches(300, 16, 25)], rank
    assert got["holdout"] == [order[:5]] * 2


# ---------------------------------------------------------------------------------------------
# The Hugging Face Trainer's fast-forward over a RankStream


@pytest.fixture
def trainer_overheads():
    """Keeps what is not the test's own work out of its budget: what a Trainer's first construction
    imports (accelerate reaches for DeepSpeed, which brings MLflow), as conftest does for Ray; and
    the gc.collect() the Trainer runs after each train() walks only the objects made since (the
    session's heap of Ray, torch and transformers took seconds)."""
    import gc

    import deepspeed  # noqa: F401

    gc.freeze()
    yield
    gc.unfreeze()


def _train(tmp_path, stream, max_steps, resume_from=None, save_at=None):
    """A SoftTargetTrainer over ``stream`` (no Ray, no DeepSpeed) on a one-layer model that notes
    the row ids each training forward sees; returns them in order."""
    import torch
    from transformers import TrainingArguments

    from incr_ray.generation.trainer import BatchStream, SoftTargetTrainer

    seen = []

    class Rows(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(1, 3)

        def forward(self, row_id):
            seen.append(row_id.tolist())
            return type("Out", (), {"logits": self.head(row_id.float()[:, None])})()

    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=max_steps, per_device_train_batch_size=2,
                             learning_rate=1e-3, save_strategy="steps" if save_at else "no", save_steps=save_at or 1,
                             use_cpu=True, report_to=[], disable_tqdm=True)
    trainer = SoftTargetTrainer(model=Rows(), args=args, train_dataset=BatchStream(stream))
    trainer.train(resume_from_checkpoint=resume_from)
    return seen


def test_a_resumed_trainer_skips_exactly_the_trained_batches_in_any_pass(tmp_path, trainer_overheads):
    """5 rows in batches of 2 (3 a pass), 7 steps; a checkpoint at step 4 lies in the second pass.
    The resumed Trainer continues with step 5's batch. (A stream of one pass per Trainer epoch, as
    before, fast-forwarded 4 batches of a 3-batch pass and started the next pass over.)"""
    import torch

    rows = torch.arange(100, 105)

    def one_pass():
        return [{"row_id": rows[i:i + 2], "labels": rows[i:i + 2] % 3,
                 "targets": torch.nn.functional.one_hot(rows[i:i + 2] % 3, 3).float()} for i in range(0, 5, 2)]

    whole = [[100 + i for i in b] for b in stream_batches(5, 2, 7)]
    assert _train(tmp_path / "first", RankStream(one_pass, 7), 7, save_at=4) == whole
    resumed = _train(tmp_path / "resumed", RankStream(one_pass, 7), 7,
                     resume_from=str(tmp_path / "first" / "hf" / "checkpoint-4"))
    assert whole[:4] + resumed == whole
