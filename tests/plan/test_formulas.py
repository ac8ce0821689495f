"""The planner's ZeRO model-state and activation formulas against hand-computed figures, and
DeepSpeed's own estimators next to them.

Figures in bytes; GB below means 1e9 bytes (the hand computations).
"""

from __future__ import annotations

import pytest

from incr_ray.plan.formulas import (
    Layout,
    activation_bytes,
    deepspeed_estimate,
    network_bytes,
    stage3_gather_bytes,
    teacher_activation_bytes,
    training_precision,
    zero_model_states,
)

GB = 1e9
PSI = 7_000_000_000
MIXED = training_precision("bf16")
FP32 = training_precision("fp32")


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
    # Fused attention (SDPA, flash) keeps no score matrices: 34 bytes per s·b·h per layer.
    assert activation_bytes(128, 8, 4096, 32, 32, fused_attention=True) == 32 * 4_194_304 * 34
    assert teacher_activation_bytes(128, 8, 4096, 32, fused_attention=True) == 4_194_304 * 34


def test_lora_shrinks_gradients_and_optimizer_states_not_weights():
    # Ψ = 7e9 with Ψ_t = 7e7 trainable (1%), N = 8, mixed precision: weights stay 2Ψ (or 2Ψ/N at
    # stage 3), gradients and Adam states are (2 + 12)·Ψ_t, partitioned as the stage says.
    t = 70_000_000

    def lora(layout, precision=MIXED):
        s = zero_model_states(PSI, 8, layout, precision, trainable=t)
        return s.gpu_bytes / GB, s.cpu_bytes / GB

    assert lora(Layout(0)) == pytest.approx((14 + 0.98, 0.0))                  # 2·7 + 14·0.07
    assert lora(Layout(1)) == pytest.approx((14 + 0.14 + 0.84 / 8, 0.0))       # 2·7 + 2·0.07 + 12·0.07/8
    assert lora(Layout(2)) == pytest.approx((14 + 0.98 / 8, 0.0))              # 2·7 + 14·0.07/8
    assert lora(Layout(3)) == pytest.approx(((14 + 0.98) / 8, 0.0))            # (2·7 + 14·0.07)/8
    assert lora(Layout(3, offload_optimizer=True)) == pytest.approx((14 / 8, 0.98 / 8))
    # fp32: 4Ψ weights, (4 + 8)·Ψ_t, DeepSpeed's fp32 copy of the trainable partition (+4Ψ_t/N).
    assert lora(Layout(2), FP32) == pytest.approx((28 + (12 + 4) * 0.07 / 8, 0.0))
    # Every parameter trainable is full fine-tuning.
    for layout in (Layout(0), Layout(1), Layout(2), Layout(3), Layout(3, True)):
        assert zero_model_states(PSI, 8, layout, MIXED, trainable=PSI) == zero_model_states(PSI, 8, layout, MIXED)


def test_network_bytes_per_step_by_stage():
    """What each GPU sends per optimizer step: 2·p·Ψ below stage 2, (A + 1)·p·Ψ at stage 2,
    A·3·p·Ψ at stage 3, each × (N − 1)/N; offload sends the same; one GPU sends nothing."""
    a, share = 4, 7 / 8  # student.grad_accum 4, N = 8

    def sent(layout, precision=MIXED, n=8, trainable=None):
        return network_bytes(PSI, n, layout, precision, a, trainable) / GB

    assert sent(Layout(0)) == sent(Layout(1)) == pytest.approx(2 * 2 * 7 * share)  # 24.5 GB
    assert sent(Layout(2)) == pytest.approx(5 * 2 * 7 * share)  # 61.25 GB
    assert sent(Layout(2, offload_optimizer=True)) == sent(Layout(2))  # offload moves states over PCIe
    assert sent(Layout(3)) == pytest.approx(4 * 3 * 2 * 7 * share)  # 147 GB
    assert sent(Layout(3, True, True)) == sent(Layout(3))
    assert sent(Layout(1), precision=FP32) == 2 * sent(Layout(1))  # 4 bytes per value
    assert sent(Layout(3), n=1) == 0
    # LoRA (Ψ_t trained): stage 3 still gathers every weight, only the gradients shrink.
    t = 7_000_000
    assert sent(Layout(1), trainable=t) == pytest.approx(2 * 2 * 0.007 * share)
    assert sent(Layout(3), trainable=t) == pytest.approx(4 * (2 * 2 * 7 + 2 * 0.007) * share)
    with pytest.raises(ValueError, match="at least 1"):
        network_bytes(PSI, 8, Layout(1), MIXED, 0)


def test_gradients_summed_in_fp32_send_twice_their_bf16_bytes_and_the_weights_the_same():
    """deepspeed.grad_reduce_dtype fp32 (the default): the gradients' reductions carry 4 bytes per
    value, the weights' all-gathers stay 2 (7B on 8 GPUs, A = 4, 7/8 of each collective sent)."""
    a, share = 4, 7 / 8

    def sent(layout):
        return network_bytes(PSI, 8, layout, MIXED, a, reduce_bytes=4) / GB

    assert sent(Layout(0)) == pytest.approx(2 * 4 * 7 * share)  # 49 GB: an all-reduce of fp32 gradients
    assert sent(Layout(1)) == pytest.approx((4 + 2) * 7 * share)  # 36.75 GB: fp32 reduce-scatter, bf16 gather
    assert sent(Layout(2)) == pytest.approx((4 * 4 + 2) * 7 * share)  # 110.25 GB
    assert sent(Layout(3)) == pytest.approx(4 * (2 * 2 * 7 + 4 * 7) * share)  # 196 GB
    assert network_bytes(PSI, 8, Layout(3), MIXED, a, reduce_bytes=2) == network_bytes(PSI, 8, Layout(3), MIXED, a)


def test_the_plan_counts_the_configured_gradient_reduction():
    from incr_ray.config import config_from_dict
    from incr_ray.plan.recommend import make_plan
    from incr_ray.plan.shapes import ModelShape

    shape = ModelShape(params=PSI, source="test", hidden_size=4096, layers=32, heads=32)
    raw = {"cluster": {"workers": 8, "use_gpu": True, "gpu_memory_gb": 80}, "deepspeed": {"precision": "bf16"},
           "student": {"grad_accum": 4}}
    fp32 = make_plan(config_from_dict(raw), shape)
    bf16 = make_plan(config_from_dict({**raw, "deepspeed": {"precision": "bf16", "grad_reduce_dtype": "precision"}}),
                      shape)
    by = lambda plan: {r.layout: r.network for r in plan.rows}  # noqa: E731
    assert by(fp32)[Layout(1)] == pytest.approx(1.5 * by(bf16)[Layout(1)])
    assert by(fp32)[Layout(3)] == pytest.approx(196 / 147 * by(bf16)[Layout(3)])

