"""The one DeepSpeed builder: presets, offload switches, precision."""

from incr_ray.config import DeepSpeedSection
from incr_ray.generation.deepspeed_config import build_deepspeed_config, resolve_precision


def test_stages_and_zero3_consolidated_save():
    for stage in (0, 1, 2, 3):
        ds = build_deepspeed_config(DeepSpeedSection(stage=stage), on_gpu=False, precision="fp32")
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto"  # the HF Trainer fills it
    z3 = build_deepspeed_config(DeepSpeedSection(stage=3), on_gpu=True, precision="bf16")
    assert z3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["bf16"]["enabled"] and not z3["fp16"]["enabled"]


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
    assert resolve_precision("bf16", on_gpu=False, bf16_supported=False) == "fp32"
    assert resolve_precision("fp16", on_gpu=True, bf16_supported=True) == "fp16"
