"""The progress reports themselves: rank 0's callback (lines and progress.json, driven through a
real TrainerState, no Ray) and teacher scoring's tenths from a real scoring pool (local Ray)."""

from __future__ import annotations

import json
import queue

import pytest
import torch
from transformers import TrainerState

from incr_ray.config import config_from_dict
from incr_ray.generation.progress import ProgressCallback, ScoringProgress, TokenCount
from incr_ray.generation.teacher import score_block


def test_rank0_callback_sends_rated_lines_and_writes_progress_json(tmp_path):
    lines: queue.Queue = queue.Queue()
    # Each collated batch has 5 real tokens in a padded 2×4 mask.
    tokens = TokenCount(lambda batch: {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])})
    dest = tmp_path / "gen_001" / "progress.json"
    cb = ProgressCallback(1, 20, lines, rows_per_step=8, workers=2, later_steps=30, tokens=tokens, dest=str(dest))
    state = TrainerState()
    state.is_world_process_zero = True
    cb.on_train_begin(None, state, None)
    for step in range(1, 21):
        tokens(None)
        state.global_step = step
        if step % 5 == 0:
            cb.on_log(None, state, None, logs={"loss": 1.0 / step, "learning_rate": 1e-4})
    cb.on_train_end(None, state, None)

    sent = [lines.get_nowait() for _ in range(lines.qsize())]
    assert len(sent) == 4 and sent[0].startswith("[gen 1] step 5/20  loss 0.2000  lr 1.00e-04  ")
    assert all(" rows/s  " in s and " tokens/s  ETA gen " in s and ", run " in s for s in sent)
    record = json.loads(dest.read_text())
    assert set(record) == {"generation", "step", "max_steps", "loss", "lr", "rows_per_s", "tokens_per_s",
                           "eta_generation_s", "eta_run_s", "updated_at"}
    assert (record["generation"], record["step"], record["max_steps"], record["loss"]) == (1, 20, 20, 1.0 / 20)
    assert record["eta_generation_s"] == 0 and record["eta_run_s"] > 0 and record["rows_per_s"] > 0
    # 5 tokens a step on rank 0, × 2 workers, at the measured pace.
    assert record["tokens_per_s"] == pytest.approx(10 * record["rows_per_s"] / 8)

    # Other ranks write nothing, and a broken destination never fails training.
    state.is_world_process_zero = False
    cb.on_log(None, state, None, logs={"loss": 0.1})
    assert lines.empty()
    state.is_world_process_zero = True
    broken = ProgressCallback(0, 20, lines, dest=str(tmp_path / "file" / "progress.json"))
    (tmp_path / "file").write_text("a file where a folder should be")
    broken.on_train_begin(None, state, None)
    state.global_step = 21
    broken.on_log(None, state, None, logs={"loss": 0.5})
    broken.on_train_end(None, state, None)


def test_scoring_reports_every_tenth_of_the_rows(ray_local, tiny_bert):
    import ray.data

    cfg = config_from_dict({"model": {"max_length": 16}, "teacher": {"batch_size": 7, "pool_size": 1}})
    rows = [{"row_id": i, "text": f"word {i} apple", "label": i % 3, "block": 1} for i in range(60)]
    said: list[str] = []
    with ScoringProgress(said.append, 60, "[gen 1] teacher scored") as progress:
        scored = score_block(ray.data.from_items(rows), tiny_bert, cfg, on_gpu=False, progress=progress.actor)
        assert scored.count() == 60
    tenths = [int(line.split(" scored ")[1].split("%")[0]) for line in said]
    assert tenths == sorted(set(tenths)) and tenths[-1] == 100 and len(tenths) >= 5, said
    assert said[-1].startswith("[gen 1] teacher scored 100% (60 of 60 rows, ")
