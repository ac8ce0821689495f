"""Growing a classification head for new classes (incr_ray.heads), on tiny real models: an encoder
with a one-layer head (BERT ``classifier``), one with a two-layer head (RoBERTa
``classifier.out_proj``) and a decoder (Llama ``score``, no bias)."""

from __future__ import annotations

import json

import pytest
import torch

from incr_ray.heads import HeadError, grow_head_folder, grown_rows, output_layer_name

OLD, NEW = ["c0", "c1", "c2"], ["c0", "c1", "c2", "hail", "sleet"]
TEXTS = ["apple and river", "a guitar song", "the snow in winter"]


def _tiny_roberta(dest) -> str:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, RobertaConfig

    from incr_ray.modeling import TINY_SHAPE, minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    hf = RobertaConfig(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_token_id, **TINY_SHAPE,
                       id2label=dict(enumerate(OLD)), label2id={n: i for i, n in enumerate(OLD)})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(hf).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return str(dest)


@pytest.fixture(params=["bert", "roberta", "llama"])
def teacher(request, tmp_path):
    if request.param == "roberta":
        return request.param, _tiny_roberta(tmp_path / "roberta")
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def _logits(path, texts=TEXTS):
    from transformers import AutoModelForSequenceClassification

    from incr_ray.modeling import classifier_logits, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, classifier_logits(model.eval(), tokenizer, texts, 16)


def test_grown_rows_copy_the_old_rows_and_draw_the_new_from_the_seed():
    weight, bias = torch.randn(3, 8), torch.randn(3)
    w, b = grown_rows(weight, bias, 2, seed=3, std=0.02)
    assert w.shape == (5, 8) and b.shape == (5,)
    assert torch.equal(w[:3], weight) and torch.equal(b[:3], bias) and torch.equal(b[3:], torch.zeros(2))
    again, _ = grown_rows(weight, bias, 2, seed=3, std=0.02)
    other, _ = grown_rows(weight, bias, 2, seed=4, std=0.02)
    assert torch.equal(w, again) and not torch.equal(w[3:], other[3:])
    assert 0.005 < w[3:].std().item() < 0.05  # N(0, std): transformers' own draw for a new head
    half, none = grown_rows(weight.bfloat16(), None, 1, seed=3)
    assert half.dtype == torch.bfloat16 and none is None and torch.equal(half[:3], weight.bfloat16())
    assert grown_rows(weight, bias, 0, seed=3)[0].shape == (3, 8)
    with pytest.raises(ValueError, match="only grows"):
        grown_rows(weight, bias, -1, seed=3)


def test_the_grown_folder_keeps_the_teachers_logits_and_loads_with_the_new_labels(teacher, tmp_path):
    from transformers import pipeline

    family, path = teacher
    layer = {"bert": "classifier", "roberta": "classifier.out_proj", "llama": "score"}[family]
    changed = grow_head_folder(path, str(tmp_path / "grown"), NEW, seed=3)
    assert changed == [f"{layer}.weight"] + ([] if family == "llama" else [f"{layer}.bias"])

    old_model, old = _logits(path)
    model, new = _logits(str(tmp_path / "grown"))
    assert model.config.num_labels == 5 and model.config.id2label == dict(enumerate(NEW))
    assert model.config.label2id == {n: i for i, n in enumerate(NEW)}
    assert new.shape == (3, 5)
    torch.testing.assert_close(torch.from_numpy(new[:, :3]), torch.from_numpy(old), rtol=0, atol=1e-5)
    # Every other weight is the teacher's, bit for bit; the new rows are run.seed's.
    before, after = old_model.state_dict(), model.state_dict()
    for name, tensor in after.items():
        if name.startswith(layer + "."):
            assert torch.equal(tensor[:3], before[name]), name
        else:
            assert torch.equal(tensor, before[name]), name
    again = tmp_path / "again"
    grow_head_folder(path, str(again), NEW, seed=3)
    assert (again / "model.safetensors").read_bytes() == (tmp_path / "grown" / "model.safetensors").read_bytes()

    classify = pipeline("text-classification", model=str(tmp_path / "grown"), top_k=None)
    assert {p["label"] for p in classify([TEXTS[0]])[0]} == set(NEW)


def test_the_output_layer_is_the_last_with_one_output_per_label(tmp_path):
    """RoBERTa's head is dense (H × H) then out_proj (C × H): with C = H both have C outputs."""
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    hf = RobertaConfig(vocab_size=100, hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                       intermediate_size=8, num_labels=4)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf)
    assert output_layer_name(model) == "classifier.out_proj"
    model.config.num_labels = 7
    with pytest.raises(HeadError, match="no classification head"):
        output_layer_name(model)


def test_a_label_map_that_does_not_start_with_the_models_labels_is_refused(tiny_bert, tmp_path):
    with pytest.raises(HeadError, match="not the first of"):
        grow_head_folder(tiny_bert, str(tmp_path / "x"), ["c1", "c0", "c2", "hail"], seed=3)
    assert not (tmp_path / "x").exists()


def test_a_lora_student_of_the_grown_model_trains_the_whole_grown_head(tiny_bert, tmp_path):
    from incr_ray.config import LoraSection
    from incr_ray.lora import with_lora
    from incr_ray.modeling import load_classifier

    grow_head_folder(tiny_bert, str(tmp_path / "grown"), NEW, seed=3)
    model, new_keys = load_classifier(str(tmp_path / "grown"), NEW, with_new_keys=True)
    assert new_keys == []  # nothing drawn at load: the head already has its size
    wrapped = with_lora(model, LoraSection(r=4, alpha=8), new_keys)
    trainable = {n: p.shape for n, p in wrapped.named_parameters() if p.requires_grad and "classifier" in n}
    assert trainable and all(shape[0] == 5 for shape in trainable.values()), trainable
    config = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert config["id2label"] == {str(i): n for i, n in enumerate(NEW)}
