"""Model loading checks that need no Ray."""

from __future__ import annotations

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
