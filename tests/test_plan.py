"""`incr-ray plan`: the ZeRO memory math against hand-computed figures, parameter counting on the
meta device, the recommendation, and the command itself. No Ray is started.

Figures in bytes; GB below means 1e9 bytes (the hand computations), GiB 2**30 (what the plan prints).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import build_tiny_model

from incr_ray.config import config_from_dict
from incr_ray.plan import (
    Layout,
    ModelShape,
    activation_bytes,
    count_parameters,
    deepspeed_estimate,
    make_plan,
    parse_count,
    plan_text,
    render_plan,
    resolve_shape,
    stage3_gather_bytes,
    teacher_activation_bytes,
    training_precision,
    zero_model_states,
)

GB = 1e9
PSI = 7_000_000_000
MIXED = training_precision("bf16")
FP32 = training_precision("fp32")


def cfg(**sections):
    return config_from_dict(sections)


def states(layout, precision=MIXED, params=PSI, n=8):
    s = zero_model_states(params, n, layout, precision)
    return s.gpu_bytes / GB, s.cpu_bytes / GB


# ---------------------------------------------------------------------------------------------
# Model states


def test_zero_stages_mixed_precision_hand_computed():
    # Ψ = 7e9, N = 8, K = 12: the ZeRO paper's 2Ψ + 2Ψ + KΨ, partitioned stage by stage.
    assert states(Layout(0)) == (112.0, 0.0)                   # 16 · 7
    assert states(Layout(1)) == (38.5, 0.0)                    # 2·7 + 2·7 + 12·7/8
    assert states(Layout(2)) == (26.25, 0.0)                   # 2·7 + 14·7/8
    assert states(Layout(3)) == (14.0, 0.0)                    # 16·7/8


def test_offload_moves_states_to_cpu_hand_computed():
    assert states(Layout(2, offload_optimizer=True)) == (14.0, 12.25)   # GPU 2Ψ; CPU (2 + 12)Ψ/N
    assert states(Layout(3, offload_optimizer=True)) == (1.75, 12.25)   # GPU 2Ψ/N
    assert states(Layout(3, True, True)) == (0.0, 14.0)                 # everything: 16Ψ/N on CPU
    # Stage 3 only moves bytes between devices: GPU + CPU stays 16Ψ/N.
    for layout in (Layout(3), Layout(3, True), Layout(3, True, True)):
        assert sum(states(layout)) == 14.0


def test_fp32_states_hand_computed():
    # 4Ψ params + 4Ψ grads + 8Ψ Adam, no master copy; plus DeepSpeed's measured fp32 extras
    # (benchmarks/zero_memory.py): +4Ψ/N at stages 1-3, +8Ψ/N at stage 3 with offload.
    assert states(Layout(0), FP32) == (112.0, 0.0)             # 16 · 7
    assert states(Layout(1), FP32) == (66.5, 0.0)              # 4·7 + 4·7 + 8·7/8 + 4·7/8
    assert states(Layout(2), FP32) == (42.0, 0.0)              # 4·7 + 12·7/8 + 4·7/8
    assert states(Layout(3), FP32) == (17.5, 0.0)              # 16·7/8 + 4·7/8
    assert states(Layout(3, offload_optimizer=True), FP32) == (3.5, 17.5)  # 4·7/8 | 12·7/8 + 8·7/8


def test_one_gpu_partitions_nothing():
    for layout in (Layout(0), Layout(1), Layout(2), Layout(3)):
        assert states(layout, n=1) == (112.0, 0.0)


@pytest.mark.parametrize("layout", [Layout(1, offload_optimizer=True), Layout(2, offload_params=True)])
def test_offload_needs_the_right_stage(layout):
    with pytest.raises(ValueError):
        zero_model_states(PSI, 8, layout, MIXED)


def test_stage3_gathers_the_largest_layer():
    assert stage3_gather_bytes(131_072_000, Layout(3), MIXED) == 4 * 131_072_000
    assert stage3_gather_bytes(131_072_000, Layout(2), MIXED) == 0
    assert stage3_gather_bytes(None, Layout(3), MIXED) == 0


def test_deepspeed_estimators_side_by_side():
    ll = 131_072_000
    z2 = deepspeed_estimate(PSI, ll, 8, 1, Layout(2))
    assert z2.gpu_bytes == 2 * PSI + 18 * PSI // 8          # 29.75 GB: DeepSpeed adds an fp32 grad copy
    assert deepspeed_estimate(PSI, ll, 8, 1, Layout(2, True)).gpu_bytes == 2 * PSI
    assert deepspeed_estimate(PSI, ll, 8, 1, Layout(3)).gpu_bytes == 4 * ll + 18 * PSI // 8
    assert deepspeed_estimate(PSI, ll, 8, 1, Layout(3, True)).gpu_bytes == 4 * ll + 2 * PSI // 8
    off = deepspeed_estimate(PSI, ll, 8, 1, Layout(3, True, True))
    assert off.gpu_bytes == 4 * ll
    assert off.cpu_bytes_per_node == int(PSI * 18 * 1.5)
    assert deepspeed_estimate(PSI, ll, 8, 1, Layout(1)) is None


# ---------------------------------------------------------------------------------------------
# Activations


def test_activations_hand_computed():
    # s=128, b=8, h=4096, a=32, L=32: s·b·h = 4,194,304; 34 + 5·32·128/4096 = 39.
    per_layer = 4_194_304 * 39
    assert activation_bytes(128, 8, 4096, 32, 32) == 32 * per_layer == 5_234_491_392
    assert activation_bytes(128, 8, 4096, 32, 32, checkpointing=True) == 2 * 4_194_304 * 32 + per_layer
    assert activation_bytes(128, 8, 4096, 32, 32, bytes_per_value=4) == 2 * 32 * per_layer
    assert teacher_activation_bytes(128, 8, 4096, 32) == per_layer
    # Linear in the micro-batch.
    assert activation_bytes(128, 16, 4096, 32, 32) == 2 * activation_bytes(128, 8, 4096, 32, 32)


# ---------------------------------------------------------------------------------------------
# Parameter counts


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


# ---------------------------------------------------------------------------------------------
# Recommendation and warnings


def plan_for(shape, **sections):
    return make_plan(cfg(**sections), shape, with_deepspeed=False)


def test_recommends_the_lowest_stage_that_fits():
    shape = ModelShape(PSI, "test")
    plan = plan_for(shape, cluster={"workers": 8, "gpu_memory_gb": 80})
    # stage 0: 112 GB × 1.1 = 123.2 GB > 80 GiB (85.9 GB); stage 1: 38.5 × 1.1 = 42.35 GB fits.
    assert plan.recommended.layout == Layout(1)
    assert plan.recommended.total == int(38.5 * GB * 1.1)
    assert not plan.warnings  # the default config is stage 2, which fits
    assert not plan.hints


def test_falls_back_to_offload_and_says_how_many_workers_avoid_it():
    shape = ModelShape(PSI, "test")
    plan = plan_for(shape, cluster={"workers": 8, "gpu_memory_gb": 10})
    # stage 3: 14 GB × 1.1 = 15.4 GB > 10 GiB; + optimizer offload: 1.75 × 1.1 = 1.925 GB fits.
    assert plan.recommended.layout == Layout(3, offload_optimizer=True)
    # Stage 3 without offload: 112 GB · 1.1 / N ≤ 10 GiB ⇔ N ≥ 11.47.
    assert "cluster.workers: 12 → deepspeed.stage: 3 without offload fits" in plan.hints
    assert any("configured ZeRO stage 2 with no offload" in w for w in plan.warnings)


def test_cpu_memory_limit_rules_out_offload():
    shape = ModelShape(PSI, "test")
    plan = make_plan(cfg(cluster={"workers": 8, "gpu_memory_gb": 10}), shape, cpu_memory_gb=50, with_deepspeed=False)
    # Optimizer offload needs 12.25 GB per rank × 8 ranks = 98 GB > 50 GiB on the one node.
    assert plan.recommended is None
    plan = make_plan(cfg(cluster={"workers": 8, "gpu_memory_gb": 10}), shape, gpus_per_node=2, cpu_memory_gb=50,
                     with_deepspeed=False)
    assert plan.recommended.layout == Layout(3, offload_optimizer=True)  # 2 ranks per node: 24.5 GB


def test_nothing_fits_lists_what_to_change():
    shape = ModelShape(PSI, "test", hidden_size=4096, layers=32, heads=32)
    sections = dict(cluster={"workers": 8, "gpu_memory_gb": 20}, model={"max_length": 512},
                    student={"batch_size": 8})
    plan = plan_for(shape, **sections)
    # Activations alone: 32 · 512·8·4096 · (34 + 5·32·512/4096) = 28.99 GB; × 1.1 > 20 GiB.
    assert plan.rows[-1].activations == 32 * 512 * 8 * 4096 * 54
    assert plan.recommended is None
    text = render_plan(plan, cfg(**sections))
    assert "will not fit on 20 GiB GPUs" in text
    assert any(h.startswith("student.gradient_checkpointing: true") for h in plan.hints)
    # b = 4 (of the batch of 8) is the largest divisor whose activations fit: 14.5 GB × 1.1.
    assert any(h.startswith("student.batch_size: 4 with student.grad_accum: 2 (same batch of 8")
               for h in plan.hints)
    # More workers cannot shrink activations, so none is suggested.
    assert not any(h.startswith("cluster.workers") for h in plan.hints)


def test_warns_when_the_configured_stage_does_not_fit():
    text = render_plan(plan_for(ModelShape(PSI, "test"), cluster={"workers": 8}, deepspeed={"stage": 0}),
                       cfg(cluster={"workers": 8}, deepspeed={"stage": 0}))
    warning = [line for line in text.splitlines() if line.startswith("WARNING:")]
    assert len(warning) == 1
    assert "ZeRO stage 0 with no offload" in warning[0] and "114.74 GiB per GPU > 80 GiB" in warning[0]
    assert "use deepspeed.stage: 1" in warning[0]


def test_teacher_larger_than_one_gpu():
    shape = ModelShape(70_000_000_000, "test", hidden_size=8192, layers=80, heads=64)
    plan = plan_for(shape, cluster={"workers": 8}, teacher={"pool_size": 8})
    assert plan.teacher.weights == 140 * GB
    assert plan.teacher.gpus_needed == 2
    assert any("teacher.gpus_per_actor: 2 and teacher.device_map_auto: true" in w for w in plan.warnings)
    text = render_plan(plan, cfg(cluster={"workers": 8}, teacher={"pool_size": 8}))
    assert "the cluster needs 16, or set teacher.pool_size: 4" in text
    plan = plan_for(shape, cluster={"workers": 8}, teacher={"gpus_per_actor": 2, "device_map_auto": True})
    assert not any("teacher" in w for w in plan.warnings)


def test_cpu_training_is_fp32_with_no_gpu_check():
    plan = plan_for(ModelShape(PSI, "test"), cluster={"use_gpu": False, "workers": 2})
    assert plan.precision.name == "fp32" and plan.recommended is None and not plan.warnings
    assert all(r.fits is None for r in plan.rows)
    assert plan.teacher.weights == 4 * PSI


# ---------------------------------------------------------------------------------------------
# The command


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "incr_ray.cli", "plan", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_cli_with_params_override(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("model:\n  base: some-org/llm-7b\ncluster:\n  workers: 8\n  gpu_memory_gb: 80\n")
    proc = run_cli("--config", str(config), "--params", "7e9")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "Ψ = 7,000,000,000 (7.00B) from --params (model.base not read)" in out
    rows = {tuple(m.group(1, 2)): line.split() for line in out.splitlines()
            if (m := re.match(r"\s+([0-3])  (\S+) ", line))}
    # 112, 38.5, 26.25, 14 GB in GiB; DeepSpeed's 29.75 GB next to stage 2.
    assert rows[("0", "-")][2] == "104.31"
    assert rows[("1", "-")][2] == "35.86"
    assert rows[("2", "-")][2:4] == ["24.45", "27.71"]
    assert rows[("3", "-")][2] == "13.04"
    assert "Recommendation: deepspeed.stage: 1, offload_optimizer: false, offload_params: false" in out
    assert "Setting accelerator" not in out


def test_cli_with_tiny_local_model(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from incr_ray.cli import main

    folder = build_tiny_model(tmp_path / "tiny", "llama", num_labels=3)
    real = sum(p.numel() for p in AutoModelForSequenceClassification.from_pretrained(folder).parameters())
    # The head is sized from data.labels: three names, as in the saved model.
    rc = main(["plan", "--set", f"model.base={folder}", "--set", "data.labels=[a, b, c]"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"Ψ = {real:,} " in out and "built on the meta device with a 3-label head (data.labels)" in out
    assert "hidden 32, layers 2, heads 2" in out


def test_cli_unknown_model_asks_for_params(capsys):
    from incr_ray.cli import main

    assert main(["plan", "--set", "model.base=some-org/not-here"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pass --params" in err[0]


def test_plan_module_does_not_import_ray():
    code = ("import sys; from incr_ray.config import Config; from incr_ray.plan import plan_text; "
            "plan_text(Config(), params_override=7_000_000_000); print('ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
