"""The memory formulas of a plan: model states under ZeRO, activations, overhead, and DeepSpeed's
own estimators next to them.

Everything here is arithmetic on a parameter count Ψ and a transformer shape. Units: bytes in the
functions, GiB (2**30 bytes) in the printed plan, the same unit as ``cluster.gpu_memory_gb``.

Sources of the formulas:

- Model states: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models", §5 (mixed-precision Adam: 2Ψ + 2Ψ + KΨ with K = 12) and Ren et al. 2021,
  "ZeRO-Offload" (the optimizer states and the gradient partition move to the CPU).
- Activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", §4 (s·b·h·(34 + 5·a·s/h) bytes per layer with 16-bit activations).
- DeepSpeed's own estimators (``estimate_zero2_model_states_mem_needs``,
  ``estimate_zero3_model_states_mem_needs``) are shown next to ours; they run without a GPU.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
from dataclasses import dataclass

GiB = 2**30
# Allocator fragmentation, CUDA context, communication buckets: added on top of every estimate.
OVERHEAD = 0.10


def gib(nbytes: float | None) -> str:
    """``nbytes`` in GiB as the plan prints it, ``n/a`` when unknown."""
    return "n/a" if nbytes is None else f"{nbytes / GiB:.2f}"


# ---------------------------------------------------------------------------------------------
# Model states: parameters, gradients, optimizer


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of each model state, and per stored activation value."""

    name: str
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int  # K in the ZeRO paper
    activation_bytes: int
    note: str


def training_precision(name: str) -> Precision:
    """bf16/fp16: the ZeRO paper's mixed-precision Adam; fp32: plain Adam, no master copy."""
    if name in ("bf16", "fp16"):
        return Precision(name, 2, 2, 12, 2,
                         f"{name} mixed precision: 2Ψ params + 2Ψ grads + 12Ψ Adam "
                         "(fp32 master weights + momentum + variance)")
    if name == "fp32":
        return Precision(name, 4, 4, 8, 4,
                         "fp32: 4Ψ params + 4Ψ grads + 8Ψ Adam (momentum + variance; no master copy) "
                         "+ DeepSpeed's fp32 partition copies at stages 1-3 (4Ψ/N; 8Ψ/N at stage 3 with offload)")
    raise ValueError(f"unknown precision {name!r}")


@dataclass(frozen=True)
class Layout:
    """One DeepSpeed ZeRO setting: stage and what is offloaded to CPU memory."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        if self.offload_params:
            return "optimizer+params"
        return "optimizer" if self.offload_optimizer else "-"

    @property
    def description(self) -> str:
        offload = {"-": "no offload", "optimizer": "optimizer offload",
                   "optimizer+params": "optimizer and parameter offload"}[self.label]
        return f"ZeRO stage {self.stage} with {offload}"

    @property
    def settings(self) -> str:
        return (f"deepspeed.stage: {self.stage}, offload_optimizer: {str(self.offload_optimizer).lower()}, "
                f"offload_params: {str(self.offload_params).lower()}")


@dataclass(frozen=True)
class ModelStates:
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per rank (one GPU's share of what lives in host memory)


def zero_model_states(params: int, n_gpus: int, layout: Layout, precision: Precision,
                      trainable: int | None = None) -> ModelStates:
    """Model-state bytes per GPU under ZeRO (Rajbhandari et al. 2020), and what offload moves.

    With p, g, K the bytes per parameter of params, grads and optimizer states (2, 2, 12 mixed
    precision; 4, 4, 8 fp32), Ψ parameters and N GPUs::

        stage 0:  (p + g + K)·Ψ              = 16Ψ
        stage 1:  p·Ψ + g·Ψ + K·Ψ/N          (optimizer states partitioned)
        stage 2:  p·Ψ + (g + K)·Ψ/N          (+ gradients partitioned)
        stage 3:  (p + g + K)·Ψ/N            (+ parameters partitioned)

    Optimizer offload (stage 2 or 3, ZeRO-Offload) keeps only the 16-bit parameters on the GPU
    (p·Ψ at stage 2, p·Ψ/N at stage 3) and moves each rank's gradient partition and optimizer
    states, (g + K)·Ψ/N, to CPU memory. Parameter offload (stage 3) moves the p·Ψ/N partition too.
    Gradient buckets and gathered layers in flight are not model states; see
    :func:`stage3_gather_bytes` and :data:`OVERHEAD`.

    fp32 training (CPU workers) adds what DeepSpeed 0.19.8 keeps beyond the paper's accounting,
    as measured by ``benchmarks/zero_memory.py``: stages 1–2 clone an fp32 copy of each rank's
    weight partition (+4Ψ/N), stage 3 holds its gradient partition twice (+4Ψ/N), and stage 3 with
    offload does both (+8Ψ/N, on the CPU side). In mixed precision the fp32 master copy is
    already part of K.

    ``trainable`` (Ψ_t, LoRA: the adapters and the head) counts the parameters that have
    gradients and optimizer states; every parameter is still held, frozen ones in the same
    precision. Gradients, optimizer states and DeepSpeed's fp32 copies then scale with Ψ_t
    instead of Ψ (stage 0: p·Ψ + (g + K)·Ψ_t, ..., stage 3: (p·Ψ + (g + K)·Ψ_t)/N).
    """
    if n_gpus < 1:
        raise ValueError("n_gpus must be at least 1")
    p, g, k = precision.param_bytes, precision.grad_bytes, precision.optimizer_bytes
    n, stage = n_gpus, layout.stage
    t = params if trainable is None else trainable
    if layout.offload_params and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    if layout.offload_optimizer and stage < 2:
        raise ValueError("optimizer offload needs ZeRO stage 2 or 3")
    if stage == 0:
        return ModelStates(int(p * params + (g + k) * t), 0)
    if stage == 1:
        return ModelStates(int(p * params + g * t + k * t / n
                               + _fp32_deepspeed_copies(t, n, layout, precision)), 0)
    params_on_gpu = p * params if stage == 2 else p * params / n
    rest = (g + k) * t / n + _fp32_deepspeed_copies(t, n, layout, precision)
    if layout.offload_params:
        return ModelStates(0, int(params_on_gpu + rest))
    if layout.offload_optimizer:
        return ModelStates(int(params_on_gpu), int(rest))
    return ModelStates(int(params_on_gpu + rest), 0)


def _fp32_deepspeed_copies(params: int, n: int, layout: Layout, precision: Precision) -> float:
    """Extra fp32 bytes per rank DeepSpeed keeps at stages 1–3 (see :func:`zero_model_states`)."""
    if precision.name != "fp32" or layout.stage == 0:
        return 0.0
    offloaded = layout.stage == 3 and (layout.offload_optimizer or layout.offload_params)
    return (8 if offloaded else 4) * params / n


def stage3_gather_bytes(largest_layer_params: int | None, layout: Layout, precision: Precision) -> int:
    """ZeRO-3 gathers each layer whole for its forward and backward: (p + g)·(largest layer).

    This is the ``4 × largest_layer_params`` term of DeepSpeed's ZeRO-3 estimator (16-bit params
    and grads); 0 for stages 0–2 and when the largest layer is unknown.
    """
    if layout.stage != 3 or not largest_layer_params:
        return 0
    return (precision.param_bytes + precision.grad_bytes) * largest_layer_params


def network_bytes(params: int, n_gpus: int, layout: Layout, precision: Precision, grad_accum: int,
                  trainable: int | None = None, reduce_bytes: int | None = None) -> int:
    """Bytes each GPU sends per optimizer step in ZeRO's collectives (ring algorithms).

    A reduce-scatter or an all-gather of M bytes sends (N − 1)/N · M from each GPU, an all-reduce
    twice that. With p bytes per weight value (the training dtype), g bytes per gradient value as
    the ranks sum them (``reduce_bytes``: 4 with ``deepspeed.grad_reduce_dtype: fp32``, the
    default, which DeepSpeed calls ``communication_data_type``; p when None), A micro-batches per
    optimizer step (``student.grad_accum``), Ψ parameters and Ψ_t of them trained (Ψ_t = Ψ
    without LoRA)::

        stage 0:     2·g·Ψ_t            the gradients all-reduced once per step
        stage 1:     (g + p)·Ψ_t        reduce-scattered once per step, the updated partitions gathered
        stage 2:     (A·g + p)·Ψ_t      gradients reduce-scattered after every micro-batch, the
                                        updated partitions gathered once
        stage 3:     A·(2·p·Ψ + g·Ψ_t)  every layer gathered for each forward and each backward,
                                        gradients reduce-scattered after every micro-batch

    each × (N − 1)/N. Below stage 2 DeepSpeed 0.19.8 reduces at gradient-accumulation boundaries
    only (``DeepSpeedEngine.allreduce_gradients``). Offload changes none of it: it moves states over
    PCIe, not the network. Between nodes, this is what a slow network carries; within a node it
    rides NVLink or PCIe.
    """
    if n_gpus < 1 or grad_accum < 1:
        raise ValueError("n_gpus and grad_accum must be at least 1")
    p, a, t = precision.param_bytes, grad_accum, params if trainable is None else trainable
    g = p if reduce_bytes is None else reduce_bytes
    share = (n_gpus - 1) / n_gpus
    if layout.stage == 0:
        sent = 2 * g * t
    elif layout.stage == 1:
        sent = (g + p) * t
    elif layout.stage == 2:
        sent = (a * g + p) * t
    else:
        sent = a * (2 * p * params + g * t)
    return int(sent * share)


@dataclass(frozen=True)
class DeepSpeedEstimate:
    gpu_bytes: int  # per GPU
    cpu_bytes_per_node: int


def deepspeed_estimate(
    params: int, largest_layer_params: int | None, gpus_per_node: int, nodes: int, layout: Layout
) -> DeepSpeedEstimate | None:
    """DeepSpeed's own model-state estimate for ``layout``; ``None`` for stages 0–1 (it has none).

    Calls ``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``,
    the functions behind the ``*_all_cold`` table printers. DeepSpeed counts, per GPU, stage 2:
    2Ψ + 18Ψ/N (its 18 = 2 fp16 grads + 4 fp32 grads + 12 Adam), offload 2Ψ; stage 3:
    4·largest layer + 18Ψ/N, optimizer offload + 2Ψ/N, param offload + 0. Its CPU figures are per
    node, with a 1.5× buffer factor, ZeRO-3 with ``zero.Init`` (as the HF Trainer does).
    """
    if layout.stage < 2:
        return None
    _quiet_deepspeed_import()
    # Imported here, not at the top: deepspeed is slow to import and optional (student_row copes without it).
    if layout.stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=layout.offload_optimizer)
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params or 0, num_gpus_per_node=gpus_per_node, num_nodes=nodes,
            cpu_offload=layout.offload_optimizer, cpu_offload_params=layout.offload_params, zero_init=True)
    return DeepSpeedEstimate(int(gpu), int(cpu))


def _quiet_deepspeed_import() -> None:
    """Import deepspeed without its "Setting accelerator to CPU" line landing in the plan."""
    if "deepspeed" in sys.modules:
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        # Imported here, not at the top: deepspeed is slow to import and optional.
        import deepspeed  # noqa: F401
    # Its logger's handler captured the redirected stream; hand it the real one back.
    for handler in logging.getLogger("DeepSpeed").handlers:
        if getattr(handler, "stream", None) is buffer:
            handler.setStream(sys.stdout)


# ---------------------------------------------------------------------------------------------
# Activations


def activation_bytes(
    seq_len: int, micro_batch: int, hidden: int, layers: int, heads: int,
    checkpointing: bool = False, bytes_per_value: int = 2, fused_attention: bool = False,
) -> int:
    """Activations a transformer keeps for backward, per GPU, for one micro-batch.

    Korthikanti et al. 2022, §4, with s = sequence length, b = micro-batch, h = hidden size,
    a = attention heads, L = layers, for 16-bit activations (1-byte dropout masks included)::

        per layer:                   s·b·h·(34 + 5·a·s/h) bytes
        no checkpointing:            L · per layer
        full checkpointing:          2·s·b·h·L  (each layer's input)  +  one layer recomputed

    The 5·a·s/h term is the attention-score matrices (softmax input, output, dropout mask); fused
    attention (SDPA, flash) never keeps them, so ``fused_attention`` drops it: s·b·h·34. (Measured on
    an H200, a 1.03B Llama at s=512 peaked 9-18% above this estimate with the 1.10 overhead, and
    28-35% below the one with the score matrices; benchmarks/results/gpu_check.json.) A classifier has
    no vocabulary-sized logits, so nothing beyond the layers is large. fp32 activations
    (``bytes_per_value=4``) double every term.
    """
    s, b, h, a, n_layers = seq_len, micro_batch, hidden, heads, layers
    per_layer = s * b * h * (34 + (0 if fused_attention else 5 * a * s / h))
    total = 2 * s * b * h * n_layers + per_layer if checkpointing else n_layers * per_layer
    return int(total * bytes_per_value / 2)


def teacher_activation_bytes(seq_len: int, batch: int, hidden: int, heads: int, bytes_per_value: int = 2,
                             fused_attention: bool = False) -> int:
    """Peak forward activations of inference (no KV cache, no grads): one layer's working set.

    Nothing is kept for a backward pass, so layers do not add up; one layer's s·b·h·(34 + 5·a·s/h)
    bytes (16-bit; without the score term under fused attention) bounds what is alive at once.
    fp32 doubles it.
    """
    return activation_bytes(seq_len, batch, hidden, 1, heads, False, bytes_per_value, fused_attention)


def with_overhead(nbytes: float) -> int:
    """``nbytes`` plus :data:`OVERHEAD` for fragmentation, CUDA context and buffers."""
    return int(nbytes * (1 + OVERHEAD))


def gpus_needed(nbytes: int, gpu_memory_bytes: int) -> int:
    """Whole GPUs that hold ``nbytes`` (already including overhead)."""
    return max(1, math.ceil(nbytes / gpu_memory_bytes))
