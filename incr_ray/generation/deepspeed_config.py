"""The one place a DeepSpeed config is built from our config.

Values that the Hugging Face ``Trainer`` already knows (batch sizes, accumulation, learning rate,
clipping, precision) stay ``"auto"`` so the two can never disagree; this builder only decides what
is ours to decide: the ZeRO stage, offload, and which optimizer implementation runs on which device.
"""

from __future__ import annotations

from typing import Any

from ..config import DeepSpeedSection

# ZeRO presets as data: the stage-specific knobs, before offload switches are applied.
ZERO_PRESETS: dict[int, dict[str, Any]] = {
    0: {"stage": 0},
    # "auto" buckets: the HF Trainer sizes them hidden_size² instead of DeepSpeed's fixed 5e8.
    1: {"stage": 1, "reduce_bucket_size": "auto"},
    2: {
        "stage": 2,
        "reduce_bucket_size": "auto",
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_scatter": True,
        "allgather_partitions": True,
    },
    3: {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        # Needed so the final save_model() on every rank writes one consolidated 16-bit model folder;
        # in-generation checkpoints skip that gather (trainer.SoftTargetTrainer.save_model).
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def resolve_precision(precision: str, on_gpu: bool, bf16_supported: bool) -> str:
    """``auto`` → bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU.

    An explicit request is kept as it is (bf16 runs on CPU too); one the hardware cannot do is
    refused by :func:`precision_problem`.
    """
    if precision != "auto":
        return precision
    if not on_gpu:
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def precision_problem(precision: str, stage: int, on_gpu: bool, bf16_supported: bool) -> str | None:
    """Why a resolved precision cannot train here (one line naming the fix), or None."""
    if precision == "fp16" and not on_gpu:
        return "deepspeed.precision fp16 needs a GPU; use bf16 or fp32 on CPU"
    if precision == "bf16" and on_gpu and not bf16_supported:
        return "deepspeed.precision bf16 is not supported by this GPU; use fp16 or fp32 (or auto)"
    if precision != "fp32" and stage == 0:
        # DeepSpeed 0.19 without ZeRO steps the optimizer on the 16-bit weights and refuses fp32
        # gradient accumulation (engine._do_optimizer_sanity_check); ZeRO-1 keeps fp32 master
        # weights and accumulates in fp32, at the same memory on one worker.
        return (f"deepspeed.stage 0 with {precision} trains 16-bit weights without an fp32 master copy; "
                "use deepspeed.stage 1 (same memory on one worker) or deepspeed.precision fp32")
    return None


def build_deepspeed_config(ds: DeepSpeedSection, on_gpu: bool, precision: str) -> dict[str, Any]:
    """DeepSpeed config dict for ``TrainingArguments(deepspeed=...)``.

    ``precision`` is the resolved one (fp32 | bf16 | fp16), see :func:`resolve_precision`; a
    combination :func:`precision_problem` refuses is a ValueError.
    """
    problem = precision_problem(precision, ds.stage, on_gpu, bf16_supported=True)
    if problem:
        raise ValueError(problem)
    zero = dict(ZERO_PRESETS[ds.stage])
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    # DeepSpeed's fused Adam needs CUDA and its CPU Adam needs a compiled op; plain torch AdamW
    # runs everywhere. CPU Adam is the right choice only when optimizer states live on the CPU
    # next to a GPU model.
    use_torch_adam = not (on_gpu and ds.offload_optimizer)
    optimizer_params: dict[str, Any] = {
        "lr": "auto",
        "betas": "auto",
        "eps": "auto",
        "weight_decay": "auto",
    }
    if use_torch_adam:
        optimizer_params["torch_adam"] = True

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": optimizer_params},
        "bf16": {"enabled": precision == "bf16"},
        # Without this DeepSpeed accumulates gradients in the training dtype: bf16 sums lose the
        # small per-micro-batch contributions.
        "data_types": {"grad_accum_dtype": "fp32"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }
    if ds.grad_reduce_dtype == "fp32":
        # Unset, DeepSpeed sums the ranks' gradients in the training dtype (engine.communication_data_type):
        # the fp32-accumulated gradients would be rounded to bf16 for the all-reduce / reduce-scatter.
        # Honoured at every stage: the ZeRO-1/2 and ZeRO-3 optimizers cast each bucket to it before the
        # collective, and the engine's own all-reduce (stage 0, and BF16_Optimizer at bf16 ZeRO-1) too.
        config["communication_data_type"] = "fp32"
    return config
