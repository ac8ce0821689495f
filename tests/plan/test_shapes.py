"""The model a plan is for: parameter counting on the meta device, the built-in shapes, --params,
and parsing a parameter count."""

from __future__ import annotations

import pytest

from incr_ray.config import config_from_dict
from incr_ray.plan.shapes import count_parameters, parse_count, resolve_shape

PSI = 7_000_000_000


def cfg(**sections):
    return config_from_dict(sections)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_meta_count_equals_materialised_model(family):
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, LlamaConfig

    if family == "bert":
        hf = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    else:
        hf = LlamaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, num_labels=3)
    total, largest = count_parameters(hf)
    model = AutoModelForSequenceClassification.from_config(hf)
    assert all(p.device == torch.device("cpu") for p in model.parameters())
    assert total == sum(p.numel() for p in model.parameters())
    assert largest == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert largest == 1000 * 32  # the token embedding


def test_known_shape_llama_7b():
    shape = resolve_shape(cfg(model={"base": "llama-7b"}, data={"source": "x.csv", "labels": ["neg", "pos"]}))
    # Llama-2-7B has 6,738,415,616 parameters; a classifier drops the 32000×4096 LM head and adds
    # a 2×4096 score head.
    assert shape.params == 6_738_415_616 - 32000 * 4096 + 2 * 4096
    assert (shape.hidden_size, shape.layers, shape.heads) == (4096, 32, 32)
    assert "built-in shape 'llama-7b'" in shape.source
    assert shape.fused_attention  # transformers runs Llama with SDPA by default: no score matrices kept


def test_params_only_plans_the_upper_bound_of_activations():
    assert not resolve_shape(cfg(), params=7_000_000_000).fused_attention


def test_params_override_does_not_read_the_model():
    shape = resolve_shape(cfg(model={"base": "some-org/not-here"}), params=PSI, hidden_size=4096, layers=32)
    assert shape.params == PSI and shape.hidden_size == 4096 and shape.largest_layer_params is None
    assert "--params" in shape.source


@pytest.mark.parametrize("text, n", [("7e9", 7_000_000_000), ("7B", 7_000_000_000), ("6.7b", 6_700_000_000),
                                     ("350M", 350_000_000), ("1000", 1000)])
def test_parse_count(text, n):
    assert parse_count(text) == n


@pytest.mark.parametrize("text", ["abc", "7X", "0", ""])
def test_parse_count_rejects(text):
    with pytest.raises(ValueError):
        parse_count(text)
