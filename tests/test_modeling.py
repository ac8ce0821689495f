"""Model loading checks that need no Ray."""

from __future__ import annotations

import pytest

from conftest import build_tiny_model
from incr_ray.modeling import head_mismatch, minilm_dir


def test_a_trained_head_of_another_size_is_found_before_training(tmp_path):
    three = build_tiny_model(tmp_path / "three", "bert", num_labels=3)
    assert head_mismatch(three, 3) is None
    assert head_mismatch(three, 2) == 3
    # A base model without a classification head gets a new one of any size.
    assert head_mismatch(minilm_dir(), 5) is None


def test_the_head_runs_in_fp32_on_a_16_bit_body(tiny_bert):
    """Teachers on GPUs load in bf16; their logits must not be rounded to bf16 by the head."""
    import torch

    from incr_ray.modeling import head_in_fp32, load_classifier, load_tokenizer

    tok = load_tokenizer(tiny_bert)
    model = load_classifier(tiny_bert, tokenizer=tok, dtype=torch.bfloat16).eval()
    enc = tok(["some words", "other words here"], return_tensors="pt", padding=True)
    with torch.no_grad():
        pooled = model.bert(**enc).pooler_output  # bf16, what the head receives
        head_in_fp32(model)
        logits = model(**enc).logits
        expected = model.classifier(pooled.float())
    assert pooled.dtype == torch.bfloat16 and model.classifier.weight.dtype == torch.float32
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_folded_temperature_divides_the_saved_logits(tmp_path, family):
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from incr_ray.modeling import fold_temperature

    path = build_tiny_model(tmp_path / family, family)
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a calm text", "another one here"], return_tensors="pt", padding=True)

    def logits():
        model = AutoModelForSequenceClassification.from_pretrained(path).eval()
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tok.pad_token_id
        with torch.no_grad():
            return model(**enc).logits.numpy()

    before = logits()
    changed = fold_temperature(path, 2.5)
    assert changed == (["classifier.weight", "classifier.bias"] if family == "bert" else ["score.weight"])
    np.testing.assert_allclose(logits(), before / 2.5, rtol=1e-5, atol=1e-6)


def test_folding_needs_a_classification_head(tmp_path):
    from incr_ray.modeling import ModelError, fold_temperature

    base = build_tiny_model(tmp_path / "base", "bert", head=False)
    with pytest.raises(ModelError, match="no classification head"):
        fold_temperature(base, 2.0)


def test_run_seed_alone_decides_a_new_heads_weights(tiny_bert_base):
    """A base model without a head gets a new one at load, seeded by the generation's seed (the
    worker calls set_seed(args.seed) before loading): the same run.seed gives the same head,
    another seed another one. (A killed-and-resumed run then ends with the reference's weights:
    tests/run/test_crash_resume.py.)"""
    import torch
    from transformers import set_seed

    from incr_ray.config import config_from_dict
    from incr_ray.generation.trainer import training_arguments
    from incr_ray.modeling import load_classifier

    def head(seed: int, generation: int = 0) -> torch.Tensor:
        cfg = config_from_dict({"run": {"seed": seed}, "model": {"base": tiny_bert_base}, "deepspeed": {"stage": 0}})
        args = training_arguments(cfg, generation, 10, "/tmp/unused", on_gpu=False, precision="fp32")
        set_seed(args.seed)
        torch.manual_seed(12345)  # anything the process drew before must not matter
        set_seed(args.seed)
        return load_classifier(tiny_bert_base, ["a", "b", "c"], dtype=torch.float32).classifier.weight.detach().clone()

    assert torch.equal(head(1), head(1))
    assert not torch.equal(head(1), head(2))
    assert not torch.equal(head(1, generation=0), head(1, generation=1))


# Length-sorted scoring (issue #24 item 13): the sub-batches, the padding and the rows' order.


@pytest.mark.parametrize("max_tokens", [1, 7, 16, 40, 10_000])
def test_length_sorted_batches_cover_every_row_once_within_the_budget(max_tokens):
    import numpy as np

    from incr_ray.modeling import length_sorted_batches

    lengths = np.random.default_rng(0).integers(1, 20, size=57)
    parts = length_sorted_batches(lengths, max_tokens)
    order = np.concatenate(parts)
    assert sorted(order.tolist()) == list(range(57))  # a permutation: each row exactly once
    assert (np.diff(lengths[order]) <= 0).all()  # longest first
    for part in parts:  # rows × the longest row fits, or the row is alone
        assert len(part) * lengths[part].max() <= max_tokens or len(part) == 1
    assert (np.arange(57)[order][np.argsort(order)] == np.arange(57)).all()  # argsort restores the order


def test_length_sorted_batches_keep_equal_lengths_in_order_and_refuse_no_budget():
    import numpy as np

    from incr_ray.modeling import length_sorted_batches

    assert [p.tolist() for p in length_sorted_batches([3, 5, 3, 5, 3], 10)] == [[1, 3], [0, 2, 4]]
    assert length_sorted_batches([], 10) == []
    with pytest.raises(ValueError, match="max_tokens"):
        length_sorted_batches([3], 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_ids_match_the_tokenizers_own_padding(side):
    import torch

    from incr_ray.modeling import load_tokenizer, padded, token_ids

    tok = load_tokenizer(minilm_dir())
    tok.padding_side = side
    texts = ["a", "hello there my friend", "x y z " * 30, "", "short one"]
    ref = tok(texts, padding=True, truncation=True, max_length=16, return_tensors="pt")
    mine = padded(token_ids(tok, texts, 16), tok.pad_token_id, side)
    assert torch.equal(ref["input_ids"], mine["input_ids"])
    assert torch.equal(ref["attention_mask"], mine["attention_mask"])


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sorted_sub_batches_give_each_row_its_own_logits_in_order(family, request):
    """Rows scored in length-sorted sub-batches get the logits they get scored alone, in the
    batch's order; given token ids instead of texts, the same."""
    import numpy as np

    from incr_ray.modeling import classifier_logits, load_classifier, load_tokenizer, token_ids

    path = request.getfixturevalue(f"tiny_{family}")
    tok = load_tokenizer(path)
    model = load_classifier(path, tokenizer=tok).eval()
    texts = [("word " * n).strip() for n in (5, 1, 12, 3, 12, 7, 2, 9)]
    alone = np.concatenate([classifier_logits(model, tok, [t], 16) for t in texts])
    for budget in (1, 20, 64, 10_000):
        np.testing.assert_allclose(classifier_logits(model, tok, texts, 16, max_tokens=budget), alone, atol=1e-5)
    ids = token_ids(tok, texts, 16)
    np.testing.assert_allclose(classifier_logits(model, tok, texts, 16, max_tokens=20, ids=ids), alone, atol=1e-5)
    assert classifier_logits(model, tok, [], 16).shape == (0, model.config.num_labels)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_features_are_what_the_heads_output_layer_reads(family, request):
    """With ``feature_layer``, each row's features come from the same forward: the logits are the
    output layer applied to them (a decoder's at its last token), in the rows' order whatever the
    sub-batches."""
    import numpy as np
    import torch

    from incr_ray.heads import output_layer_name
    from incr_ray.modeling import classifier_logits, load_classifier, load_tokenizer

    path = request.getfixturevalue(f"tiny_{family}")
    tok = load_tokenizer(path)
    model = load_classifier(path, tokenizer=tok).eval()
    layer = output_layer_name(model)
    texts = [("word " * n).strip() for n in (5, 1, 12, 3, 7)]
    logits, features = classifier_logits(model, tok, texts, 16, max_tokens=20, feature_layer=layer)
    assert features.shape == (5, model.config.hidden_size) and features.dtype == np.float32
    head = model.get_submodule(layer)
    with torch.no_grad():
        again = head(torch.from_numpy(features)).numpy()
    np.testing.assert_allclose(again, logits, atol=1e-5)
    alone = np.concatenate([classifier_logits(model, tok, [t], 16, feature_layer=layer)[1] for t in texts])
    np.testing.assert_allclose(features, alone, atol=1e-5)
    np.testing.assert_array_equal(classifier_logits(model, tok, texts, 16, max_tokens=20), logits)
    empty = classifier_logits(model, tok, [], 16, feature_layer=layer)
    assert empty[0].shape == (0, model.config.num_labels) and empty[1].shape == (0, model.config.hidden_size)
