"""A LoRA run end to end on a local Ray: a tiny Llama-style decoder under ZeRO-3 on 2 workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from small_run import small_config

pytestmark = pytest.mark.e2e


def test_lora_run_saves_merged_models_and_adapters(ray_local, tmp_path, tiny_llama):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, pipeline

    from incr_ray.run.loop import run_generations

    cfg = small_config(tmp_path, tiny_llama, "lora", data={"synthetic_rows": 600}, method={"k": 2},
                       cluster={"workers": 2}, deepspeed={"stage": 3},
                       student={"epochs": 1, "lora": {"r": 4, "alpha": 8}}, eval={"retention_rows": 0})
    manifest = run_generations(cfg, say=lambda s: None)
    root = Path(cfg.run_dir)
    gens = manifest["generations"]
    assert [g["status"] for g in gens] == ["finished", "finished"]
    plain = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(tiny_llama).parameters())
    for g in gens:  # q_proj and v_proj of 2 layers at r=4, and the 3×32 head
        assert (g["train"]["trainable_params"], g["train"]["total_params"]) == (2 * 2 * 4 * 64 + 3 * 32, plain)
        assert g["adapter"] == f"gen_{g['index']:03d}/adapter"

    adapter = root / "gen_001" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        root / "gen_000" / "model")  # the initial model: the teacher's folder
    model_dir = root / "gen_001" / "model"
    assert (adapter / "adapter_model.safetensors").stat().st_size * 50 < (model_dir / "model.safetensors").stat().st_size
    out = pipeline("text-classification", model=str(model_dir), device="cpu")(["red words", "blue words here"])
    assert {o["label"] for o in out} <= set(manifest["label_names"])

    initial = load_file(str(Path(tiny_llama) / "model.safetensors"))
    before, after = (load_file(str(root / f"gen_{g:03d}" / "model" / "model.safetensors")) for g in (0, 1))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):  # not adapted: every generation keeps the initial weights
        assert torch.equal(before[name], initial[name]) and torch.equal(after[name], initial[name]), name
    for name in ("score.weight", "model.layers.0.self_attn.q_proj.weight"):  # the head, a merged delta
        assert not torch.equal(after[name], before[name]), name
    # gen_001/model is exactly its initial model (gen_000) with gen_001's adapter merged in.
    base = AutoModelForSequenceClassification.from_pretrained(root / "gen_000" / "model")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for name, weight in after.items():
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-6, msg=name)
    assert gens[1]["metrics"]["accuracy"] > 0.4, gens[1]["metrics"]
