"""EWC's Fisher file and anchor on a tiny real BERT, without Ray: the expected Fisher against its
closed form at the head, which weights it covers (full and LoRA), the file, and the penalty a
student's Trainer adds (plain and peft models)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from incr_ray.config import LoraSection, config_from_dict
from incr_ray.generation.fisher import (EwcAnchor, diagonal_fisher, estimate_fisher, fisher_bytes, read_fisher,
                                        single_rows, trained_weight_names, with_row_ids)
from incr_ray.generation.trainer import SoftTargetTrainer, make_collate
from incr_ray.method.losses import distillation_loss, ewc_penalty

TEXTS = np.array(["rain and wind", "sun all day", "snow then sun", "wind wind rain", "a cold grey sky",
                  "clear", "storm coming in fast", "sun"], dtype=object)


def _batches(tokenizer, size: int = 3):
    collate = with_row_ids(make_collate(tokenizer, 3, 24))
    labels = np.arange(len(TEXTS)) % 3
    return [collate({"text": TEXTS[i:i + size], "label": labels[i:i + size], "row_id": np.arange(len(TEXTS))[i:i + size]})
            for i in range(0, len(TEXTS), size)]


@pytest.fixture(scope="module")
def bert(tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(tiny_bert), AutoTokenizer.from_pretrained(tiny_bert)


def test_the_head_gets_the_closed_form_of_the_expected_fisher(bert):
    """For logits z = W·h + b, ∂log p_y/∂W[c, j] = (1[c = y] − p_c)·h_j, so Σ_y p_y (…)² = p_c(1 − p_c)·h_j²."""
    model, tok = bert
    fisher, rows = diagonal_fisher(model, single_rows(_batches(tok), 2), ["classifier.weight", "classifier.bias"])
    assert rows == 2
    model.eval()
    want_w, want_b = torch.zeros_like(fisher["classifier.weight"]), torch.zeros_like(fisher["classifier.bias"])
    with torch.no_grad():
        for inputs in single_rows(_batches(tok), 2):
            h = model.bert(**inputs).pooler_output[0]
            p = torch.softmax(model.classifier(h), -1)
            want_w += (p * (1 - p))[:, None] * h[None, :] ** 2
            want_b += p * (1 - p)
    torch.testing.assert_close(fisher["classifier.weight"], want_w / rows, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fisher["classifier.bias"], want_b / rows, rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # left as it found them


def test_rows_are_the_first_distinct_ones_up_to_the_limit(bert):
    _, tok = bert
    once = _batches(tok)
    assert len(list(single_rows(once + once, 100))) == len(TEXTS)  # a second pass is not more rows
    five = list(single_rows(once, 5))
    assert len(five) == 5 and set(five[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    assert all(r["input_ids"].shape[0] == 1 for r in five)
    # Identical (text, label) rows share an id: a repeat early in the block is skipped, and the
    # rows after it still count (it used to end the estimate there).
    collate = with_row_ids(make_collate(tok, 3, 24))
    ids = np.array([0, 1, 0, 2, 3, 4, 5, 6])
    batch = collate({"text": TEXTS[ids], "label": ids % 3, "row_id": ids})
    rows = list(single_rows([batch, batch], 6))
    assert len(rows) == 6
    torch.testing.assert_close(rows[2]["input_ids"], batch["input_ids"][3:4])  # row id 2, after the repeat


def test_which_weights_a_student_trains(bert):
    model, _ = bert
    names = [n for n, _ in model.named_parameters()]
    assert trained_weight_names(model, LoraSection()) == names
    lora = trained_weight_names(model, LoraSection(r=4))
    assert lora == [n for n in names if n.startswith("classifier.")
                    or n.endswith(("attention.self.query.weight", "attention.self.value.weight"))]
    assert len(lora) == 2 + 2 * 2  # the head; query and value of each of the 2 layers


def test_the_file_holds_fisher_and_anchor_and_reads_back(tmp_path, bert):
    model, tok = bert
    names = ["classifier.weight", "bert.encoder.layer.1.output.dense.bias"]
    fisher, rows = diagonal_fisher(model, single_rows(_batches(tok), 2), names)
    path = tmp_path / "fisher.safetensors"
    data = fisher_bytes(fisher, dict(model.named_parameters()), {"generation": 0, "rows": rows, "estimator": "expected"})
    # the same inputs give the same bytes (safetensors writes a metadata map in a random order)
    assert all(fisher_bytes(fisher, dict(model.named_parameters()), {"rows": rows, "estimator": "expected",
                                                                     "generation": 0}) == data for _ in range(5))
    path.write_bytes(data)
    f, anchors, meta = read_fisher(str(path))
    assert set(f) == set(anchors) == set(names) and meta == {"generation": 0, "rows": 2, "estimator": "expected"}
    for n in names:
        torch.testing.assert_close(f[n], fisher[n])
        torch.testing.assert_close(anchors[n], dict(model.named_parameters())[n].detach())


def test_estimate_writes_the_file_and_the_figures(tmp_path, tiny_bert, bert):
    _, tok = bert
    cfg = config_from_dict({"method": {"ewc": 1.0, "ewc_rows": 1}, "model": {"max_length": 24},
                            "student": {"lora": {"r": 4}}})  # the head and 4 projections: a cheap test
    fig = estimate_fisher(cfg, 3, tiny_bert, _batches(tok), "cpu", str(tmp_path / "f0"))
    assert fig["rows"] == 1 and fig["weights"] == 6 and fig["estimator"] == "expected"
    assert fig["bytes"] == (tmp_path / "f0").stat().st_size
    _, anchors, meta = read_fisher(str(tmp_path / "f0"))
    assert meta["generation"] == 3 and fig["params"] == sum(a.numel() for a in anchors.values())
    assert 0 < fig["mean"] <= fig["max"]


def _anchor_of(model, tok, strength: float, names=None) -> EwcAnchor:
    names = names or [n for n, _ in model.named_parameters()]
    fisher, _ = diagonal_fisher(model, single_rows(_batches(tok), 1), names)
    return EwcAnchor(fisher, {n: p.detach().clone() for n, p in model.named_parameters()}, strength)


def test_a_full_student_is_pulled_back_by_lambda_f_delta(bert):
    teacher, tok = bert
    anchor = _anchor_of(teacher, tok, 50.0, ["classifier.weight", "classifier.bias", "bert.pooler.dense.weight"])
    fisher = {n: f.clone() for n, f in anchor.fisher.items()}
    student = copy.deepcopy(teacher)
    assert all(d.abs().max() == 0 for d in anchor.deltas(student))  # it starts at θ*
    with torch.no_grad():
        student.classifier.weight.add_(0.1)
    loss = anchor.added_to(torch.tensor(1.0), student)
    torch.testing.assert_close(loss - 1.0, 0.5 * 50.0 * fisher["classifier.weight"].sum() * 0.01)
    loss.backward()
    torch.testing.assert_close(student.classifier.weight.grad, 50.0 * fisher["classifier.weight"] * 0.1)
    assert student.bert.pooler.dense.weight.grad.abs().max() == 0  # no delta, no pull
    assert student.bert.embeddings.word_embeddings.weight.grad is None  # not in the file
    fig = anchor.figures()
    assert fig["weights"] == len(fisher) and fig["left_out"] == 0 and fig["penalty_last"] > 0
    assert fig["share_last"] == pytest.approx(fig["penalty_last"] / (1.0 + fig["penalty_last"]))


def test_a_lora_student_is_penalised_through_its_adapters_and_head(bert):
    """Fresh adapters (B = 0) start at the teacher's weights; an adapted weight's delta is the
    adapter's scale·B·A; the head's is the trained copy's; a head of another shape is left out."""
    from incr_ray.lora import with_lora

    teacher, tok = bert
    names = trained_weight_names(teacher, LoraSection(r=4))
    anchor = _anchor_of(teacher, tok, 10.0, names)
    fisher = {n: f.clone() for n, f in anchor.fisher.items()}
    student = with_lora(copy.deepcopy(teacher), LoraSection(r=4, alpha=8))
    assert ewc_penalty(anchor.deltas(student), [f for _, f, _ in anchor.terms], 10.0).item() == 0.0
    assert anchor.figures()["weights"] == len(names) == 6
    query = student.get_base_model().bert.encoder.layer[0].attention.self.query
    with torch.no_grad():
        query.lora_B["default"].weight.fill_(0.05)
    delta = query.get_delta_weight("default")
    loss = anchor.added_to(torch.tensor(0.0), student)
    f = fisher["bert.encoder.layer.0.attention.self.query.weight"]
    torch.testing.assert_close(loss, 0.5 * 10.0 * (f * delta.detach() ** 2).sum())
    loss.backward()
    assert query.lora_A["default"].weight.grad.abs().max() > 0 and query.base_layer.weight.grad is None

    grown = EwcAnchor({"classifier.weight": torch.ones(4, 32)}, {"classifier.weight": torch.zeros(4, 32)}, 1.0)
    grown.deltas(student)
    assert grown.figures()["left_out"] == 1 and grown.figures()["weights"] == 0


def test_the_trainer_adds_the_penalty_to_its_loss(tiny_bert, bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    _, tok = bert
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    anchor = _anchor_of(model, tok, 5.0, ["classifier.weight"])
    with torch.no_grad():
        model.classifier.weight.mul_(2.0)
    trainer = SoftTargetTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[]),
                                ewc=anchor)
    inputs = make_collate(tok, 3, 24)({"text": TEXTS[:2], "label": np.array([1, 2])})
    plain = {k: v.clone() for k, v in inputs.items()}
    loss = trainer.compute_loss(model, inputs)
    logits = model(**{k: v for k, v in plain.items() if k not in ("labels", "targets")}).logits
    data_loss = distillation_loss(logits, plain["targets"], plain["labels"])
    penalty = ewc_penalty(anchor.deltas(model), [f for _, f, _ in anchor.terms], 5.0)
    assert penalty > 0
    torch.testing.assert_close(loss, data_loss + penalty)


def test_the_recipe_step_writes_the_file_on_rank_0_only(tmp_path, tiny_bert, bert):
    """recipe.consolidate: rank 0, method.ewc > 0, the rows of its training batches; others, and ewc 0, nothing."""
    from types import SimpleNamespace

    from incr_ray.generation.recipe import FISHER, StudentRequest, consolidate

    _, tok = bert
    labels = np.arange(len(TEXTS)) % 3
    numpy_batches = [{"text": TEXTS[i:i + 4], "label": labels[i:i + 4], "row_id": np.arange(i, i + 4)} for i in (0, 4)]
    train_batches = lambda collate: [collate(b) for b in numpy_batches]  # noqa: E731 - the recipe's callable
    student = SimpleNamespace(tokenizer=tok, args=SimpleNamespace(device="cpu"))
    request = StudentRequest(generation=2, init_model=tiny_bert, label_names=["c0", "c1", "c2"], rows=8,
                             model_dest="unused", ray_storage="unused")
    cfg = config_from_dict({"method": {"ewc": 2.0, "ewc_rows": 1}, "model": {"max_length": 24},
                            "student": {"lora": {"r": 4}}})
    for rank in (1, 0):
        figures = consolidate(cfg, request, student, train_batches, rank, str(tmp_path), tiny_bert)
        assert (figures is None) == (rank == 1) and (tmp_path / FISHER).exists() == (rank == 0)
    assert figures["rows"] == 1 and read_fisher(str(tmp_path / FISHER))[2]["generation"] == 2
    off = config_from_dict({"model": {"max_length": 24}})
    assert consolidate(off, request, student, train_batches, 0, str(tmp_path / "off"), tiny_bert) is None
