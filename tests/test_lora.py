"""LoRA students without Ray: the adapters' targets per architecture, what trains in full, the
counts, and a merged model that gives the adapted model's logits (real peft, tiny models)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from incr_ray.config import ConfigError, LoraSection
from incr_ray.lora import (check_lora, merged_model, modules_to_save, parameter_counts, target_modules,
                           unmatched_targets, with_lora)
from incr_ray.modeling import load_classifier, load_tokenizer


@pytest.mark.parametrize("model_type, expected", [
    ("bert", ["query", "value"]), ("roberta", ["query", "value"]), ("distilbert", ["q_lin", "v_lin"]),
    ("llama", ["q_proj", "v_proj"]), ("mistral", ["q_proj", "v_proj"]), ("qwen2", ["q_proj", "v_proj"]),
    ("gpt2", ["c_attn"]),
])
def test_default_targets_are_the_query_and_value_projections(model_type, expected):
    assert target_modules(model_type, None) == expected


def test_configured_targets_win_and_an_unknown_architecture_asks_for_them():
    assert target_modules("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert target_modules("mystery", ["attn"]) == ["attn"]
    with pytest.raises(ConfigError, match=r"^student.lora: no default target modules for model type 'mystery'; "
                                          r"set student.lora.target_modules") as err:
        target_modules("mystery", None)
    assert "\n" not in str(err.value)


def test_unmatched_targets_follow_peft_name_matching():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "score"]
    assert unmatched_targets(names, ["q_proj", "self_attn.v_proj"]) == []
    assert unmatched_targets(names, ["query", "proj"]) == ["query", "proj"]  # whole dotted parts only


def test_the_head_and_weights_new_at_load_train_in_full():
    assert modules_to_save(["bert", "dropout", "classifier"], ["classifier.weight", "classifier.bias"]) == ["classifier"]
    assert modules_to_save(["model", "score"], []) == ["score"]
    # A checkpoint saved without a pooler: its random pooler must train too (and reach the adapter).
    assert modules_to_save(["bert", "classifier"], ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]) == [
        "classifier", "bert.pooler.dense"]


def test_check_lora_names_the_model_s_linear_layers(tiny_llama):
    assert check_lora(LoraSection(r=4), tiny_llama) == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match=r"\['query'\] match no module of 'llama' model .*'q_proj'"):
        check_lora(LoraSection(r=4, target_modules=["query", "v_proj"]), tiny_llama)


def _inputs(tokenizer):
    return tokenizer(["a short text", "another, somewhat longer text here"], padding=True, return_tensors="pt")


def test_merged_model_gives_the_adapted_logits_and_the_adapter_is_small(tiny_llama, tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(tiny_llama)

    def load_initial():
        return load_classifier(tiny_llama, ["a", "b"], tokenizer=tok, dtype=torch.float32)

    model, new_keys = load_classifier(tiny_llama, ["a", "b"], tokenizer=tok, dtype=torch.float32, with_new_keys=True)
    assert new_keys == ["score.weight"]  # the saved head has 3 labels: resized, drawn at random
    peft_model = with_lora(model, LoraSection(r=4, alpha=8), new_keys)
    trainable, total = parameter_counts(peft_model)
    plain = sum(p.numel() for p in load_initial().parameters())
    # q and v of 2 layers: r·(32 + 32) each; the 2×32 head trains in full.
    assert (trainable, total) == (2 * 2 * 4 * 64 + 2 * 32, plain)
    with torch.no_grad():  # what training does: B leaves zero, the head moves
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**_inputs(tok)).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = merged_model(load_initial, str(tmp_path / "adapter"), torch.float32).eval()
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        torch.testing.assert_close(merged(**_inputs(tok)).logits, expected, rtol=1e-5, atol=1e-5)
    # Merged deltas only in the adapted layers; everything else is the initial model's.
    initial = load_initial().state_dict()
    after = merged.state_dict()
    assert torch.equal(after["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(after["model.layers.1.self_attn.k_proj.weight"], initial["model.layers.1.self_attn.k_proj.weight"])
    assert not torch.equal(after["model.layers.0.self_attn.q_proj.weight"], initial["model.layers.0.self_attn.q_proj.weight"])
    sizes = {f: os.path.getsize(tmp_path / "adapter" / f) for f in os.listdir(tmp_path / "adapter")}
    weights = sum(p.numel() * 4 for p in merged.parameters())
    assert sizes["adapter_model.safetensors"] < weights / 20, (sizes, weights)
    np.testing.assert_array_equal(after["score.weight"].numpy(),
                                  dict(peft_model.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
                                  .detach().numpy())
