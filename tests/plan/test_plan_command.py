"""`incr-ray plan` itself: the command's output, its errors, and that planning never imports Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import build_tiny_model


def run_cli(*args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "incr_ray.cli", "plan", *args],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow  # a fresh interpreter
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


@pytest.mark.slow  # a fresh interpreter
def test_plan_module_does_not_import_ray():
    code = ("import sys; from incr_ray.config import Config; from incr_ray.plan import plan_text; "
            "plan_text(Config(), params_override=7_000_000_000); print('ray' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.slow  # a fresh interpreter
def test_the_shipped_gpu_config_plans_as_shipped_without_a_hub():
    """jobs/gpu_cluster.yaml names a hub model; offline, its built-in shape stands in. `stage: auto`
    picks ZeRO-1 for 1.5B parameters on 8 × 24 GiB (ZeRO-3's gathers would cross the nodes)."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1")
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "gpu_cluster.yaml")
    proc = subprocess.run([sys.executable, "-m", "incr_ray.cli", "plan", "--config", shipped],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built-in shape 'Qwen/Qwen2.5-1.5B'" in proc.stdout
    assert "deepspeed.stage auto -> ZeRO-1: the first stage whose plan fits 24 GiB per GPU" in proc.stdout
    configured = [line for line in proc.stdout.splitlines() if "<- configured" in line]
    assert len(configured) == 1 and configured[0].split()[0] == "1", configured


def test_lora_plan_counts_adapters_and_head(tmp_path, capsys):
    from incr_ray.cli import main
    from incr_ray.config import config_from_dict
    from incr_ray.plan import resolve_shape

    folder = build_tiny_model(tmp_path / "tiny", "llama", num_labels=3)
    cfg = config_from_dict({"model": {"base": folder}, "data": {"labels": ["a", "b", "c"]},
                            "student": {"lora": {"r": 4}}})
    shape = resolve_shape(cfg)
    # q_proj and v_proj (32 → 32) in 2 layers: 4·(32 + 32) each; the 3×32 score head in full.
    assert shape.trainable_params == 2 * 2 * 4 * 64 + 3 * 32 and shape.lora_targets == ("q_proj", "v_proj")
    full = resolve_shape(config_from_dict({**cfg.to_dict(), "student": {"lora": {"r": 0}}}))
    assert full.params == shape.params and full.trainable_params is None
    rc = main(["plan", "--set", f"model.base={folder}", "--set", "data.labels=[a, b, c]", "--set", "student.lora.r=4"])
    out = capsys.readouterr().out
    assert rc == 0 and f"LoRA         r=4 on q_proj, v_proj + the head (student.lora): Ψ_t = {shape.trainable_params:,}" in out
    # Without a model to count on, the shape must come from the command line.
    assert main(["plan", "--params", "7e9", "--set", "student.lora.r=8"]) == 2
    assert "pass --hidden-size and --layers" in capsys.readouterr().err
    big = resolve_shape(config_from_dict({"student": {"lora": {"r": 8}}, "data": {"labels": ["a", "b"]}}),
                        params=7_000_000_000, hidden_size=4096, layers=32)
    assert big.trainable_params == 2 * 32 * 8 * 2 * 4096 + 2 * 4096
