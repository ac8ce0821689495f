"""Rank 0's per-step figures without Ray: a real Hugging Face Trainer logging into a real MLflow
SQLite store, or through the Trainer's own TensorBoard callback."""

from __future__ import annotations

import numpy as np

from incr_ray.config import config_from_dict
from incr_ray.generation.progress import MlflowStepLogger
from incr_ray.generation.trainer import REPORT_TO, SoftTargetTrainer, make_collate, reporting_env


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
    from transformers import TrainerState

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
