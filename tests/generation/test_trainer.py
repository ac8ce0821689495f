"""The Hugging Face pieces of student training, without Ray: step counts, the collate, the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from incr_ray.generation.trainer import SoftTargetTrainer, make_collate, steps_for
from incr_ray.method.losses import distillation_loss
from incr_ray.modeling import NonFiniteError


def test_steps_for_counts_optimizer_steps_per_worker():
    assert steps_for(rows=1000, workers=2, batch_size=32, epochs=1, grad_accum=1) == 16  # ceil(500/32)
    assert steps_for(rows=1000, workers=2, batch_size=32, epochs=2, grad_accum=4) == 8
    assert steps_for(rows=10, workers=4, batch_size=32, epochs=1, grad_accum=1) == 1


def test_collate_pads_dynamically_and_builds_targets(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    collate = make_collate(tok, num_labels=3, max_length=64)
    batch = {"text": np.array(["short", "a somewhat longer text here"], dtype=object), "label": np.array([2, 0])}
    out = collate(batch)
    assert out["input_ids"].shape[1] == len(tok("a somewhat longer text here")["input_ids"])  # longest row
    torch.testing.assert_close(out["targets"], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    soft = np.array([[0.05, 0.05, 0.9], [0.9, 0.06, 0.04]])
    out = collate({**batch, "target": np.array(list(soft), dtype=object)})
    torch.testing.assert_close(out["targets"], torch.tensor(soft, dtype=torch.float32))


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.0), (2.0, 0.3)])
def test_trainer_loss_is_the_distillation_loss(tiny_bert, tmp_path, temperature, alpha):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    trainer = SoftTargetTrainer(model=model, args=args, temperature=temperature, alpha=alpha)
    inputs = make_collate(tok, 3, 32)({"text": np.array(["a b", "c d e"], dtype=object), "label": np.array([1, 2]),
                                       "target": np.array([[0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])})
    expected_inputs = {k: v.clone() for k, v in inputs.items()}
    loss = trainer.compute_loss(model, inputs)
    logits = model(input_ids=expected_inputs["input_ids"], attention_mask=expected_inputs["attention_mask"],
                   token_type_ids=expected_inputs["token_type_ids"]).logits
    ref = distillation_loss(logits, expected_inputs["targets"], expected_inputs["labels"], temperature, alpha)
    torch.testing.assert_close(loss, ref)


def test_a_nan_loss_stops_training_naming_the_fix(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.classifier.weight.fill_(float("nan"))
    trainer = SoftTargetTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]))
    inputs = make_collate(tok, 3, 32)({"text": np.array(["a b", "c d e"], dtype=object), "label": np.array([1, 2])})
    with pytest.raises(NonFiniteError, match="deepspeed.precision: bf16"):
        trainer.compute_loss(model, inputs)


def test_min_steps_passes_over_a_small_block_more_often():
    assert steps_for(rows=210, workers=1, batch_size=32, epochs=1, grad_accum=1) == 7
    assert steps_for(rows=210, workers=1, batch_size=32, epochs=1, grad_accum=1, min_steps=100) == 100
    assert steps_for(rows=10**6, workers=8, batch_size=32, epochs=1, grad_accum=1, min_steps=100) == 3907


def test_run_window_places_each_generation_on_one_curve():
    from incr_ray.config import config_from_dict
    from incr_ray.generation.trainer import generation_steps, run_lr_window

    cfg = config_from_dict({"method": {"k": 3}, "student": {"batch_size": 10, "min_steps": 0, "warmup_ratio": 0.5,
                                                              "schedule": "run"}})
    sizes = [100, 100, 80]
    windows = [run_lr_window(cfg, sizes, g) for g in range(4)]
    assert [w[0] for w in windows] == [0, 10, 20, 28]  # offsets: the steps of the generations before
    assert {w[1:] for w in windows} == {(5, 28)}  # warmup: half of generation 0; total: all three
    assert generation_steps(cfg, 80) == 8
    # Replay's expected rows count from generation 1 on.
    replaying = config_from_dict({**cfg.to_dict(), "replay": {"fraction": 0.5}})
    assert run_lr_window(replaying, sizes, 2)[0] == 10 + 15


def _trainer(tiny_bert, tmp_path, **kwargs):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=1.0,
                             max_steps=10, warmup_steps=2, lr_scheduler_type="linear")
    return model, SoftTargetTrainer(model=model, args=args, **kwargs)


def test_the_run_schedule_replaces_the_per_generation_one(tiny_bert, tmp_path):
    from incr_ray.method.schedule import run_lr_factor

    model, trainer = _trainer(tiny_bert, tmp_path, lr_window=(10, 4, 40))
    trainer.create_optimizer()
    scheduler = trainer.create_scheduler(10, trainer.optimizer)
    lrs = []
    for _ in range(10):
        lrs.append(scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([run_lr_factor(10 + s, 4, 40) for s in range(10)])
    _, plain = _trainer(tiny_bert, tmp_path / "plain")
    plain.create_optimizer()
    assert plain.create_scheduler(10, plain.optimizer).get_last_lr()[0] == 0.0  # HF's linear warmup from 0


def _assert_annealed(tiny_bert, tmp_path, alphas, **kwargs):
    """An annealing trainer of 10 steps: at each (step, α) of ``alphas`` its loss is the
    distillation loss at that α. Returns the trainer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model, trainer = _trainer(tiny_bert, tmp_path, anneal=True, **kwargs)
    raw = {"text": np.array(["a b", "c d e"], dtype=object), "label": np.array([1, 2]),
           "target": np.array([[0.1, 0.8, 0.1], [0.2, 0.1, 0.7]])}
    with torch.no_grad():
        logits = model(**{k: v for k, v in make_collate(tok, 3, 32)(raw).items()
                          if k not in ("targets", "labels")}).logits
    trainer.state.max_steps = 10
    for step, alpha in alphas:
        trainer.state.global_step = step
        inputs = make_collate(tok, 3, 32)(raw)
        expected = distillation_loss(logits, inputs["targets"], inputs["labels"], 1.0, alpha)
        with torch.no_grad():
            torch.testing.assert_close(trainer.compute_loss(model, inputs), expected)
    return trainer


def test_annealing_turns_the_soft_loss_into_the_hard_one(tiny_bert, tmp_path):
    _assert_annealed(tiny_bert, tmp_path, ((0, 0.0), (5, 0.5), (10, 1.0)))


def test_the_precision_record_says_what_gradients_are_summed_in():
    """`grad_reduce` is what the DeepSpeed engine uses (its communication_data_type, as it read our
    config; the engine itself is built in tests/generation/test_deepspeed_config.py), else the config's."""
    from types import SimpleNamespace

    from incr_ray.config import DeepSpeedSection
    from incr_ray.generation.deepspeed_config import build_deepspeed_config
    from incr_ray.generation.trainer import precision_record

    bf16 = torch.nn.Linear(2, 2).to(torch.bfloat16)
    ds = build_deepspeed_config(DeepSpeedSection(stage=3), on_gpu=True, precision="bf16")
    trained = SimpleNamespace(model=bf16, loss_dtypes={}, deepspeed=SimpleNamespace(communication_data_type=torch.float32))
    assert precision_record(trained, "bf16", ds) == {"requested": "bf16", "model_weights": "bf16", "master_weights": "fp32",
                                                     "grad_accum": "fp32", "grad_reduce": "fp32"}
    own = build_deepspeed_config(DeepSpeedSection(stage=3, grad_reduce_dtype="precision"), on_gpu=True, precision="bf16")
    assert precision_record(SimpleNamespace(model=bf16, loss_dtypes={}), "bf16", own)["grad_reduce"] == "bf16"


def test_balanced_fine_tuning_trains_at_its_share_after_the_main_schedule(tiny_bert, tmp_path):
    """student.balanced_epochs: the main training's own schedule (the Trainer's linear one, or the
    run-long one) over its steps, then the balanced pass at its constant share of the peak."""
    from incr_ray.method.schedule import linear_lr_factor, run_lr_factor

    def lrs(trainer):
        trainer.create_optimizer()
        scheduler, out = trainer.create_scheduler(10, trainer.optimizer), []
        for _ in range(10):
            out.append(scheduler.get_last_lr()[0])
            trainer.optimizer.step()
            scheduler.step()
        return out

    _, plain = _trainer(tiny_bert, tmp_path / "plain", balanced=(8, 0.1))  # 10 steps, 2 of them warmup
    assert lrs(plain) == pytest.approx([linear_lr_factor(s, 2, 8) for s in range(8)] + [0.1, 0.1])
    _, run = _trainer(tiny_bert, tmp_path / "run", lr_window=(10, 4, 40), balanced=(8, 0.25))
    assert lrs(run) == pytest.approx([run_lr_factor(10 + s, 4, 40) for s in range(8)] + [0.25, 0.25])


def test_annealing_ends_with_the_main_training_and_the_balanced_losses_are_kept(tiny_bert, tmp_path):
    trainer = _assert_annealed(tiny_bert, tmp_path, ((4, 0.5), (8, 1.0), (9, 1.0)), balanced=(8, 0.1))
    assert len(trainer.balanced_losses) == 2  # steps 8 and 9: the balanced pass's


def test_a_memory_plans_its_per_class_rows_on_the_run_schedule():
    from incr_ray.config import config_from_dict
    from incr_ray.generation.trainer import generation_steps, run_lr_window

    cfg = config_from_dict({"method": {"k": 3}, "student": {"batch_size": 10, "min_steps": 0, "schedule": "run"},
                            "replay": {"per_class": 20}})
    assert run_lr_window(cfg, [100, 100, 80], 2, classes=3)[0] == 10 + generation_steps(cfg, 100 + 60)
