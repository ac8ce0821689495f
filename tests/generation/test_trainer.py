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
