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
