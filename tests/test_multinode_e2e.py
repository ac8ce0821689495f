"""R4, two nodes: a two-node Ray cluster (head + one more node, both on 127.0.0.1), started once
for the module, and one run on it that spans both: a Llama-style decoder whose config has no pad
token (HF pools the last non-pad token), one worker per node, ZeRO-3 in bf16 (DeepSpeed's CPU
accelerator trains in bf16), LoRA students. Then the multi-node path check on the same cluster."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from small_run import small_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def two_node_cluster():
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this module needs its own cluster; the session's local Ray restarts on next use
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def decoder_run(two_node_cluster, tmp_path_factory):
    from conftest import build_tiny_model, timings
    from incr_ray.run.loop import run_generations

    tmp = tmp_path_factory.mktemp("multinode")
    llama = build_tiny_model(tmp / "tiny_llama", "llama")
    # Two workers of 2 CPUs on nodes of 2 CPUs: one worker per node.
    cfg = small_config(tmp, llama, "multinode", method={"k": 2}, data={"synthetic_rows": 600},
                       cluster={"workers": 2, "cpus_per_worker": 2}, deepspeed={"stage": 3, "precision": "bf16"},
                       student={"epochs": 1, "lora": {"r": 4, "alpha": 8}}, eval={"retention_rows": 0})
    manifest = run_generations(cfg, say=lambda s: None)
    timings("R4 two nodes", manifest)
    from incr_ray.run.loop import evaluate_run

    evaluated = evaluate_run(cfg.run_dir)  # `incr-ray evaluate`: the final model in an actor pool
    return SimpleNamespace(cfg=cfg, manifest=manifest, root=Path(cfg.run_dir), base=llama, evaluated=evaluated)


def test_the_cluster_has_two_nodes_on_loopback(two_node_cluster):
    import ray

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}


def test_the_run_spans_both_nodes(decoder_run):
    gens = decoder_run.manifest["generations"]
    assert [g["status"] for g in gens] == ["finished", "finished"]
    assert all(g["train"]["nodes"] == 2 and g["train"]["workers"] == 2 for g in gens), [g["train"] for g in gens]
    # The teacher's actor pool scored generation 1's block.
    assert gens[1]["rows"] == gens[1]["block_rows"] > 0
    assert json.loads((decoder_run.root / "run.json").read_text())["status"] == "finished"


def test_a_bf16_model_has_one_set_of_figures(decoder_run):
    """The workers trained in bf16 and evaluated the model they saved; `incr-ray evaluate` scores the
    same folder in an actor pool: one model, the same NLL and ECE (#24 item 8: the workers once
    scored DeepSpeed's bf16 module, head included, and the pool an fp32 head)."""
    [(g, pool)] = decoder_run.evaluated
    gen = decoder_run.manifest["generations"][g]
    assert gen["train"]["precision"]["model_weights"] == "bf16", gen["train"]["precision"]
    assert gen["metrics"]["n"] == pool["n"] > 0
    for k in ("nll", "ece"):
        assert abs(gen["metrics"][k] - pool[k]) <= 1e-4, (k, gen["metrics"][k], pool[k])
    assert gen["metrics"]["accuracy"] == pool["accuracy"]


def test_a_decoder_without_a_pad_token_gets_one_and_loads_in_a_pipeline(decoder_run):
    from transformers import AutoConfig, pipeline

    assert AutoConfig.from_pretrained(decoder_run.base).pad_token_id is None
    final = decoder_run.root / "gen_001" / "model"
    assert AutoConfig.from_pretrained(final).pad_token_id is not None
    out = pipeline("text-classification", model=str(final), device="cpu")(["red words", "blue words here"])
    assert {o["label"] for o in out} <= set(decoder_run.manifest["label_names"])


def test_lora_trains_adapters_and_the_head_only(decoder_run):
    from transformers import AutoModelForSequenceClassification

    plain = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(decoder_run.base).parameters())
    for g in decoder_run.manifest["generations"]:  # q_proj and v_proj of 2 layers at r=4, and the 3×32 head
        assert (g["train"]["trainable_params"], g["train"]["total_params"]) == (2 * 2 * 4 * 64 + 3 * 32, plain)
        assert g["adapter"] == f"gen_{g['index']:03d}/adapter"
    assert decoder_run.manifest["generations"][1]["metrics"]["accuracy"] > 0.4
    for g in (0, 1):  # the model card says how it was trained
        assert "LoRA" in (decoder_run.root / f"gen_{g:03d}" / "model" / "README.md").read_text()


def test_lora_saves_the_adapter_beside_a_merged_model(decoder_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    root = decoder_run.root
    adapter = root / "gen_001" / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        root / "gen_000" / "model")  # the initial model: the teacher's folder
    model_dir = root / "gen_001" / "model"
    assert (adapter / "adapter_model.safetensors").stat().st_size * 50 < (model_dir / "model.safetensors").stat().st_size

    initial = load_file(str(Path(decoder_run.base) / "model.safetensors"))
    before, after = (load_file(str(root / f"gen_{g:03d}" / "model" / "model.safetensors")) for g in (0, 1))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.embed_tokens.weight"):  # not adapted: every generation keeps the initial weights
        # A bf16 run saves 16-bit weights: the fp32 initial ones rounded once, then never again.
        assert before[name].dtype == torch.bfloat16 and torch.equal(before[name], initial[name].to(torch.bfloat16))
        assert torch.equal(after[name], before[name]), name
    for name in ("score.weight", "model.layers.0.self_attn.q_proj.weight"):  # the head, a merged delta
        assert not torch.equal(after[name], before[name]), name
    # gen_001/model is exactly its initial model (gen_000) with gen_001's adapter merged in.
    base = AutoModelForSequenceClassification.from_pretrained(root / "gen_000" / "model")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    for name, weight in after.items():
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-6, msg=name)


def test_bf16_trains_with_fp32_targets_masters_and_accumulation(decoder_run):
    """The targets reach the loss in fp32 (the Trainer would cast them to bf16), gradients
    accumulate in fp32 beside fp32 master weights and are summed across the two nodes in fp32 (the
    engine's communication_data_type), and run.json says so for every generation."""
    for g in decoder_run.manifest["generations"]:
        assert g["train"]["precision"] == {
            "requested": "bf16", "model_weights": "bf16", "master_weights": "fp32", "grad_accum": "fp32",
            "grad_reduce": "fp32", "loss_targets": "fp32", "loss_logits": "bf16",
        }, g["train"]["precision"]
        assert all(np.isfinite(v) for v in g["metrics"].values())
        assert g["train"]["zero_stage"] == 3


def test_a_path_some_node_cannot_see_is_found(two_node_cluster, tmp_path):
    """The multi-node path check asks every node: a path that exists only on the driver's side
    (here: one that exists nowhere, since both nodes share this machine) is reported per node."""
    from incr_ray.run.folder import unreachable_on_nodes

    here = tmp_path / "seen"
    here.touch()
    assert unreachable_on_nodes([str(here)]) == []
    missing = unreachable_on_nodes([str(here), str(tmp_path / "nowhere")])
    assert len(missing) == 2 and {p for _, p in missing} == {str(tmp_path / "nowhere")}
