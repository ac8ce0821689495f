"""Rank 0's progress reports: the callback's lines and progress.json (driven through a real
TrainerState, no Ray), teacher scoring's tenths from a real scoring pool (local Ray), and the per-step
figures a real Hugging Face Trainer logs into a real MLflow SQLite store or through the Trainer's own
TensorBoard callback."""

from __future__ import annotations

import json
import queue

import numpy as np
import pytest
import torch
from transformers import TrainerState

from incr_ray.config import config_from_dict
from incr_ray.generation.progress import MlflowStepLogger, ProgressCallback, ScoringProgress, TokenCount
from incr_ray.generation.teacher import score_block
from incr_ray.generation.trainer import REPORT_TO, SoftTargetTrainer, make_collate, reporting_env


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

    from incr_ray.resolve import ClusterFacts, resolve

    cfg = resolve(config_from_dict({"model": {"max_length": 16}, "teacher": {"batch_size": 7, "pool_size": 1}}),
                  ClusterFacts(node_cpus=(2.0,)))
    rows = [{"row_id": i, "text": f"word {i} apple", "label": i % 3, "block": 1} for i in range(60)]
    said: list[str] = []
    with ScoringProgress(said.append, 60, "[gen 1] teacher scored") as progress:
        scored = score_block(ray.data.from_items(rows), tiny_bert, cfg, on_gpu=False, progress=progress.actor)
        assert scored.count() == 60
    tenths = [int(line.split(" scored ")[1].split("%")[0]) for line in said]
    assert tenths == sorted(set(tenths)) and tenths[-1] == 100 and len(tenths) >= 5, said
    assert said[-1].startswith("[gen 1] teacher scored 100% (60 of 60 rows, ")


def _train(tiny_bert, tmp_path, steps: int, callbacks=(), report_to=()):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    collate = make_collate(tok, 3, 32)
    rows = [{"text": f"words {i} and more", "label": i % 3} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), use_cpu=True, report_to=list(report_to), max_steps=steps,
                             per_device_train_batch_size=4, logging_steps=1, learning_rate=1e-3, save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True)
    trainer = SoftTargetTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(tiny_bert), args=args, train_dataset=rows,
        data_collator=lambda batch: collate({"text": np.array([r["text"] for r in batch], dtype=object),
                                             "label": np.array([r["label"] for r in batch])}))
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()


def test_rank0_logs_each_steps_loss_and_learning_rate(tiny_bert, tmp_path, mlflow_db):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{mlflow_db}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "a"))).info.run_id
    said = []
    _train(tiny_bert, tmp_path, steps=3, callbacks=[MlflowStepLogger(uri, run_id, 1, said.append)])
    loss = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in loss] == [1, 2, 3] and all(np.isfinite(m.value) and m.value > 0 for m in loss)
    lr = sorted(client.get_metric_history(run_id, "learning_rate"), key=lambda m: m.step)
    assert [m.step for m in lr] == [1, 2, 3] and lr[0].value > lr[-1].value  # linear decay
    assert said == []
    # Other ranks log nothing.
    other = MlflowStepLogger(uri, run_id, 1, said.append)
    other.on_log(None, TrainerState(global_step=9, is_world_process_zero=False), None, logs={"loss": 1.0})
    assert 9 not in {m.step for m in client.get_metric_history(run_id, "loss")}


def test_a_failing_store_is_said_once_and_training_goes_on(tiny_bert, tmp_path, mlflow_db):
    said = []
    # A run id the store does not have: every log call fails.
    _train(tiny_bert, tmp_path, steps=3, callbacks=[MlflowStepLogger(f"sqlite:///{mlflow_db}", "0" * 32, 2, said.append)])
    assert len(said) == 1 and said[0].startswith("[gen 2] warning: MLflow stopped taking the per-step figures (")
    assert said[0].endswith("training goes on") and "\n" not in said[0]


def test_tensorboard_is_the_trainers_own_callback_in_the_generations_folder(tiny_bert, tmp_path, monkeypatch):
    cfg = config_from_dict({"tracking": {"backend": "tensorboard"}})
    log_dir = tmp_path / "tensorboard" / "gen_000"
    env = reporting_env(cfg, str(log_dir))
    assert env == {"TENSORBOARD_LOGGING_DIR": str(log_dir)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _train(tiny_bert, tmp_path, steps=2, report_to=REPORT_TO["tensorboard"])
    [events] = list(log_dir.glob("events.out.tfevents.*"))
    assert b"train/loss" in events.read_bytes()
    assert reporting_env(config_from_dict({"tracking": {"backend": "wandb", "experiment": "p"}}), None) == {
        "WANDB_PROJECT": "p"}
    assert reporting_env(config_from_dict({}), str(log_dir)) == {}
