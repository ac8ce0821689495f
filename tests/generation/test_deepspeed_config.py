"""The one DeepSpeed builder: presets, offload switches, precision."""

from incr_ray.config import DeepSpeedSection
import pytest

from incr_ray.generation.deepspeed_config import build_deepspeed_config, precision_problem, resolve_precision


def test_stages_and_zero3_consolidated_save():
    for stage in (0, 1, 2, 3):
        ds = build_deepspeed_config(DeepSpeedSection(stage=stage), on_gpu=False, precision="fp32")
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the HF Trainer fills it
    z3 = build_deepspeed_config(DeepSpeedSection(stage=3), on_gpu=True, precision="bf16")
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["bf16"]["enabled"] and not z3["fp16"]["enabled"]
    for stage in (1, 2, 3):  # the Trainer fills these from the model's hidden size
        ds = build_deepspeed_config(DeepSpeedSection(stage=stage), on_gpu=True, precision="bf16")
        assert ds["zero_optimization"]["reduce_bucket_size"] == "auto"


def test_gradients_accumulate_in_fp32():
    for precision in ("bf16", "fp16", "fp32"):
        ds = build_deepspeed_config(DeepSpeedSection(stage=1), on_gpu=True, precision=precision)
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_offload_switches_and_optimizer_choice():
    cpu = build_deepspeed_config(DeepSpeedSection(stage=3, offload_optimizer=True, offload_params=True),
                                 on_gpu=False, precision="fp32")
    assert cpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert cpu["optimizer"]["params"]["torch_adam"] is True  # no compiled CPU Adam needed on CPU
    gpu = build_deepspeed_config(DeepSpeedSection(stage=2, offload_optimizer=True), on_gpu=True, precision="bf16")
    assert "torch_adam" not in gpu["optimizer"]["params"]  # DeepSpeed's CPU Adam next to a GPU model
    assert gpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is True


def test_precision_resolution():
    assert resolve_precision("auto", on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", on_gpu=True, bf16_supported=False) == "fp16"
    assert resolve_precision("bf16", on_gpu=False, bf16_supported=False) == "bf16"  # CPU bf16 runs
    assert resolve_precision("fp16", on_gpu=True, bf16_supported=True) == "fp16"


def test_impossible_precision_requests_are_refused():
    assert precision_problem("fp16", 2, on_gpu=False, bf16_supported=False) == (
        "deepspeed.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    assert "not supported by this GPU" in precision_problem("bf16", 2, on_gpu=True, bf16_supported=False)
    assert "fp32 master copy" in precision_problem("bf16", 0, on_gpu=True, bf16_supported=True)
    assert precision_problem("bf16", 1, on_gpu=False, bf16_supported=False) is None
    assert precision_problem("fp32", 0, on_gpu=True, bf16_supported=True) is None
    with pytest.raises(ValueError, match="fp32 master copy"):
        build_deepspeed_config(DeepSpeedSection(stage=0), on_gpu=True, precision="bf16")
