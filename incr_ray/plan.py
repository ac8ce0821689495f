"""`incr-ray plan`: per-GPU memory of a run, worked out before anything starts.

Everything here is arithmetic on a parameter count Ψ and a transformer shape; no weights are
loaded and Ray is never imported. The parameter count comes from one of three places, and the plan
says which: the base model's ``config.json`` (the classifier is built on the ``meta`` device and its
parameters counted), a small built-in table of well-known shapes (:data:`KNOWN_SHAPES`, usable as
``model.base`` here only), or ``--params`` given on the command line.

Units: bytes in the functions, GiB (2**30 bytes) in the printed plan, the same unit as
``cluster.gpu_memory_gb``.

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
import dataclasses
import io
import math
import re
from dataclasses import dataclass, field

from .config import Config
from .modeling import ModelError

GiB = 2**30
# Allocator fragmentation, CUDA context, communication buckets: added on top of every estimate.
OVERHEAD = 0.10

# Well-known shapes, as Hugging Face config arguments. Planning only: training needs a real folder.
# Llama-2 7B/13B/70B, Llama-3 8B/70B, Mistral-7B v0.1, Qwen2-7B, BERT base/large.
KNOWN_SHAPES: dict[str, dict] = {
    "bert-base": dict(model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, vocab_size=30522),
    "bert-large": dict(model_type="bert", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, vocab_size=30522),
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000),
    "llama-13b": dict(model_type="llama", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, intermediate_size=13824, vocab_size=32000),
    "llama-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, intermediate_size=28672, vocab_size=32000),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256),
    "llama3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, intermediate_size=28672, vocab_size=128256),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000),
    "qwen2-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, intermediate_size=18944, vocab_size=152064),
}


# ---------------------------------------------------------------------------------------------
# The model: parameter count and shape


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need to know about a model; ``None`` where the source does not say."""

    params: int
    source: str  # where ``params`` came from, printed verbatim
    hidden_size: int | None = None
    layers: int | None = None
    heads: int | None = None
    largest_layer_params: int | None = None  # one module's own parameters (ZeRO-3 gathers it whole)


def parse_count(text: str) -> int:
    """``"7e9"``, ``"7000000000"``, ``"7B"``, ``"6.7b"``, ``"350M"`` → an integer parameter count."""
    m = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBtT]?)\s*", text)
    if not m:
        raise ValueError(f"{text!r} is not a parameter count; write e.g. 7e9 or 7B")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    value = float(m.group(1)) * scale
    if value < 1:
        raise ValueError(f"{text!r} is not a positive parameter count")
    return int(round(value))


def _first_attr(cfg, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            return value
    return None


def count_parameters(hf_config, trust_remote_code: bool = False) -> tuple[int, int]:
    """Build ``AutoModelForSequenceClassification`` from ``hf_config`` on the meta device.

    Returns ``(total, largest_layer)``: the number of distinct parameters (tied ones once, as
    ``model.parameters()`` yields them) and the most parameters any one module owns directly,
    which is what DeepSpeed's ZeRO-3 estimator calls the largest layer. No memory is allocated.
    """
    import torch
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(hf_config, trust_remote_code=trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return total, largest


def _shape_from_hf_config(hf_config, source: str, trust_remote_code: bool = False) -> ModelShape:
    total, largest = count_parameters(hf_config, trust_remote_code)
    return ModelShape(
        params=total,
        source=source,
        hidden_size=_first_attr(hf_config, ("hidden_size", "d_model", "dim", "n_embd")),
        layers=_first_attr(hf_config, ("num_hidden_layers", "n_layers", "num_layers", "n_layer")),
        heads=_first_attr(hf_config, ("num_attention_heads", "n_heads", "n_head")),
        largest_layer_params=largest,
    )


def head_labels(cfg: Config) -> tuple[int, str]:
    """How many classes the planned head has, and why: data.labels, the synthetic classes, or 2."""
    if cfg.data.labels:
        return len(cfg.data.labels), "data.labels"
    if cfg.data.source == "synthetic":
        return cfg.data.synthetic_classes, "data.synthetic_classes"
    return 2, "assumed; set data.labels for the exact head"


def resolve_shape(
    cfg: Config,
    params: int | None = None,
    hidden_size: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
) -> ModelShape:
    """The model to plan for.

    With ``params`` the base model is not read at all (it may be a hub name on an offline machine):
    Ψ is ``params`` and the shape is whatever ``hidden_size``/``layers``/``heads`` say. Otherwise
    ``model.base`` is a local folder (or ``minilm``), else a :data:`KNOWN_SHAPES` name; its config is
    built on the meta device with a head for :func:`head_labels` classes and counted.
    """
    if params is not None:
        return ModelShape(params=params, source="--params (model.base not read)", hidden_size=hidden_size,
                          layers=layers, heads=heads)
    from pathlib import Path

    from transformers import AutoConfig

    from .modeling import MINILM, check_classifier, resolve_model_path

    base = cfg.model.base
    num_labels, why = head_labels(cfg)
    head = f"{num_labels}-label head ({why})"
    # id2label rather than num_labels: a folder's own id2label of another length would clash with it.
    names = cfg.data.labels or [f"LABEL_{i}" for i in range(num_labels)]
    head_kwargs = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if base == MINILM or Path(base).expanduser().exists():
        path = resolve_model_path(base)
        check_classifier(path, cfg.model.trust_remote_code)
        hf = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code, **head_kwargs)
        shape = _shape_from_hf_config(hf, f"{path}/config.json, built on the meta device with a {head}",
                                      cfg.model.trust_remote_code)
    elif base in KNOWN_SHAPES:
        kwargs = dict(KNOWN_SHAPES[base])
        model_type = kwargs.pop("model_type")
        hf = AutoConfig.for_model(model_type, **head_kwargs, **kwargs)
        shape = _shape_from_hf_config(hf, f"built-in shape {base!r} ({model_type}), built on the meta device "
                                          f"with a {head}")
    else:
        raise ModelError(
            f"model.base {base!r} is neither a local model folder nor a built-in shape "
            f"({', '.join(KNOWN_SHAPES)}); pass --params (e.g. --params 7e9 --hidden-size 4096 --layers 32)"
        )
    overrides = {k: v for k, v in (("hidden_size", hidden_size), ("layers", layers), ("heads", heads)) if v}
    if overrides:
        flags = ", ".join("--" + k.replace("_", "-") for k in overrides)
        shape = dataclasses.replace(shape, **overrides, source=f"{shape.source}; {flags} from the command line")
    return shape


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


# The order a recommendation tries them in: fewest moving parts first, offload last.
RECOMMENDATION_ORDER = (Layout(0), Layout(1), Layout(2), Layout(3), Layout(3, True), Layout(3, True, True))
# Rows of the printed table: the above plus ZeRO-Offload at stage 2, for comparison.
TABLE_LAYOUTS = (Layout(0), Layout(1), Layout(2), Layout(2, True), Layout(3), Layout(3, True), Layout(3, True, True))


@dataclass(frozen=True)
class ModelStates:
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per rank (one GPU's share of what lives in host memory)


def zero_model_states(params: int, n_gpus: int, layout: Layout, precision: Precision) -> ModelStates:
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
    """
    if n_gpus < 1:
        raise ValueError("n_gpus must be at least 1")
    p, g, k = precision.param_bytes, precision.grad_bytes, precision.optimizer_bytes
    n, stage = n_gpus, layout.stage
    if layout.offload_params and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    if layout.offload_optimizer and stage < 2:
        raise ValueError("optimizer offload needs ZeRO stage 2 or 3")
    if stage == 0:
        return ModelStates(int((p + g + k) * params), 0)
    if stage == 1:
        return ModelStates(int((p + g) * params + k * params / n
                               + _fp32_deepspeed_copies(params, n, layout, precision)), 0)
    params_on_gpu = p * params if stage == 2 else p * params / n
    rest = (g + k) * params / n + _fp32_deepspeed_copies(params, n, layout, precision)
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
    import logging
    import sys

    if "deepspeed" in sys.modules:
        return
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        import deepspeed  # noqa: F401
    # Its logger's handler captured the redirected stream; hand it the real one back.
    for handler in logging.getLogger("DeepSpeed").handlers:
        if getattr(handler, "stream", None) is buffer:
            handler.setStream(sys.stdout)


# ---------------------------------------------------------------------------------------------
# Activations


def activation_bytes(
    seq_len: int, micro_batch: int, hidden: int, layers: int, heads: int,
    checkpointing: bool = False, bytes_per_value: int = 2,
) -> int:
    """Activations a transformer keeps for backward, per GPU, for one micro-batch.

    Korthikanti et al. 2022, §4, with s = sequence length, b = micro-batch, h = hidden size,
    a = attention heads, L = layers, for 16-bit activations (1-byte dropout masks included)::

        per layer:                   s·b·h·(34 + 5·a·s/h) bytes
        no checkpointing:            L · per layer
        full checkpointing:          2·s·b·h·L  (each layer's input)  +  one layer recomputed

    The 5·a·s/h term is the attention-score matrices; fused (SDPA/flash) attention does not keep
    them, so this is an upper bound there. A classifier has no vocabulary-sized logits, so nothing
    beyond the layers is large. fp32 activations (``bytes_per_value=4``) double every term.
    """
    s, b, h, a, n_layers = seq_len, micro_batch, hidden, heads, layers
    per_layer = s * b * h * (34 + 5 * a * s / h)
    total = 2 * s * b * h * n_layers + per_layer if checkpointing else n_layers * per_layer
    return int(total * bytes_per_value / 2)


def teacher_activation_bytes(seq_len: int, batch: int, hidden: int, heads: int, bytes_per_value: int = 2) -> int:
    """Peak forward activations of inference (no KV cache, no grads): one layer's working set.

    Nothing is kept for a backward pass, so layers do not add up; one layer's s·b·h·(34 + 5·a·s/h)
    bytes (16-bit) bounds what is alive at once. fp32 doubles it.
    """
    return activation_bytes(seq_len, batch, hidden, 1, heads, False, bytes_per_value)


def with_overhead(nbytes: float) -> int:
    """``nbytes`` plus :data:`OVERHEAD` for fragmentation, CUDA context and buffers."""
    return int(nbytes * (1 + OVERHEAD))


def gpus_needed(nbytes: int, gpu_memory_bytes: int) -> int:
    """Whole GPUs that hold ``nbytes`` (already including overhead)."""
    return max(1, math.ceil(nbytes / gpu_memory_bytes))


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class StudentRow:
    layout: Layout
    states: ModelStates
    deepspeed: DeepSpeedEstimate | None
    gathered: int
    activations: int | None
    total: int  # per GPU: (states + gathered + activations) × (1 + OVERHEAD)
    cpu_per_node: int
    fits: bool | None  # None: no GPU budget to check against (CPU training)


@dataclass(frozen=True)
class TeacherPlan:
    precision: str
    weights: int
    activations: int | None
    total: int
    gpus_needed: int | None


@dataclass
class Plan:
    shape: ModelShape
    precision: Precision
    precision_note: str
    n_gpus: int
    gpus_per_node: int
    nodes: int
    on_gpu: bool
    gpu_budget: int | None
    cpu_budget: int | None
    seq_len: int
    micro_batch: int
    checkpointing: bool
    rows: list[StudentRow]
    configured: StudentRow
    recommended: StudentRow | None
    teacher: TeacherPlan
    hints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def student_row(
    shape: ModelShape, layout: Layout, precision: Precision, n_gpus: int, gpus_per_node: int, nodes: int,
    seq_len: int, micro_batch: int, checkpointing: bool, gpu_budget: int | None, cpu_budget: int | None,
    with_deepspeed: bool = True,
) -> StudentRow:
    states = zero_model_states(shape.params, n_gpus, layout, precision)
    gathered = stage3_gather_bytes(shape.largest_layer_params, layout, precision)
    acts = None
    if shape.hidden_size and shape.layers:
        acts = activation_bytes(seq_len, micro_batch, shape.hidden_size, shape.layers,
                                shape.heads or max(1, shape.hidden_size // 128), checkpointing,
                                precision.activation_bytes)
    total = with_overhead(states.gpu_bytes + gathered + (acts or 0))
    cpu_per_node = states.cpu_bytes * gpus_per_node
    ds = None
    if with_deepspeed:
        try:
            ds = deepspeed_estimate(shape.params, shape.largest_layer_params, gpus_per_node, nodes, layout)
        except Exception:  # noqa: BLE001 - DeepSpeed missing or changed: the plan stands without it
            ds = None
    fits = None
    if gpu_budget is not None:
        fits = total <= gpu_budget and (cpu_budget is None or cpu_per_node <= cpu_budget)
    return StudentRow(layout, states, ds, gathered, acts, total, cpu_per_node, fits)


def make_plan(
    cfg: Config, shape: ModelShape, gpus_per_node: int | None = None, cpu_memory_gb: float | None = None,
    with_deepspeed: bool = True,
) -> Plan:
    """Work out every row, the recommendation, the warnings and the hints for ``cfg`` and ``shape``."""
    n = cfg.cluster.workers
    gpn = min(gpus_per_node or n, n)
    nodes = math.ceil(n / gpn)
    on_gpu = cfg.cluster.use_gpu is not False
    requested = cfg.deepspeed.precision
    if not on_gpu:
        prec_name, why = "fp32", "cluster.use_gpu: false → fp32 on CPU"
    elif requested == "auto":
        prec_name, why = "bf16", "deepspeed.precision: auto → bf16 assumed (fp16 on GPUs without bf16: same bytes)"
    else:
        prec_name, why = requested, f"deepspeed.precision: {requested}"
    precision = training_precision(prec_name)
    gpu_budget = int(cfg.cluster.gpu_memory_gb * GiB) if on_gpu else None
    cpu_budget = int(cpu_memory_gb * GiB) if cpu_memory_gb else None
    s, b, ckpt = cfg.model.max_length, cfg.student.batch_size, cfg.student.gradient_checkpointing

    def row(layout: Layout, micro_batch: int = b, checkpointing: bool = ckpt, workers: int = n, ds: bool = True):
        return student_row(shape, layout, precision, workers, min(gpn, workers), math.ceil(workers / gpn),
                           s, micro_batch, checkpointing, gpu_budget, cpu_budget, ds and with_deepspeed)

    rows = [row(layout) for layout in TABLE_LAYOUTS]
    by_layout = {r.layout: r for r in rows}
    ds_cfg = cfg.deepspeed
    configured = by_layout[Layout(ds_cfg.stage, ds_cfg.offload_optimizer, ds_cfg.offload_params)]
    recommended = next((by_layout[lay] for lay in RECOMMENDATION_ORDER if by_layout[lay].fits), None)
    teacher = plan_teacher(cfg, shape, on_gpu)

    plan = Plan(shape, precision, why, n, gpn, nodes, on_gpu, gpu_budget, cpu_budget, s, b, ckpt, rows,
                configured, recommended, teacher)
    if not on_gpu:
        return plan

    budget_gib = cfg.cluster.gpu_memory_gb
    if not configured.fits:
        where = (f"{_gib(configured.total)} GiB per GPU > {budget_gib:g} GiB (cluster.gpu_memory_gb)"
                 if configured.total > gpu_budget else
                 f"{_gib(configured.cpu_per_node)} GiB of CPU memory per node > {cpu_memory_gb:g} GiB "
                 "(--cpu-memory-gb)")
        plan.warnings.append(
            f"the configured {configured.layout.description} (deepspeed section) will not fit: "
            f"{where}; " + (f"use {recommended.layout.settings}" if recommended else "see the hints below"))
    if teacher.gpus_needed is not None and teacher.gpus_needed > cfg.teacher.gpus_per_actor:
        plan.warnings.append(
            f"the teacher needs {teacher.gpus_needed} GPUs per actor (~{_gib(teacher.total)} GiB) but "
            f"teacher.gpus_per_actor is {cfg.teacher.gpus_per_actor:g}; set teacher.gpus_per_actor: "
            f"{teacher.gpus_needed} and teacher.device_map_auto: true")
    elif teacher.gpus_needed and teacher.gpus_needed > 1 and not cfg.teacher.device_map_auto:
        plan.warnings.append("the teacher spans several GPUs; set teacher.device_map_auto: true")

    if recommended is None or recommended.layout.offload_optimizer:
        plan.hints.extend(_hints(shape, cfg, row, recommended))
    return plan


def _hints(shape: ModelShape, cfg: Config, row, recommended: StudentRow | None) -> list[str]:
    """What to change when nothing fits, or when only offload does.

    ``row(layout, micro_batch=, checkpointing=, workers=, ds=)`` evaluates one variation of the config.
    """
    hints = []
    b, accum, n = cfg.student.batch_size, cfg.student.grad_accum, cfg.cluster.workers
    candidates = RECOMMENDATION_ORDER if recommended is None else RECOMMENDATION_ORDER[:4]
    goal = "fits" if recommended is None else "fits without offload"

    def first_fit(**change) -> Layout | None:
        return next((lay for lay in candidates if row(lay, ds=False, **change).fits), None)

    if not cfg.student.gradient_checkpointing and shape.hidden_size:
        fit = first_fit(checkpointing=True)
        if fit:
            hints.append(f"student.gradient_checkpointing: true → {fit.settings} {goal}")
    if shape.hidden_size:
        # Smaller micro-batches that divide the batch, so more accumulation keeps it exactly.
        for mb in (d for d in range(b - 1, 0, -1) if (b * accum) % d == 0):
            fit = first_fit(micro_batch=mb)
            if fit:
                hints.append(f"student.batch_size: {mb} with student.grad_accum: {b * accum // mb} "
                             f"(same batch of {b * accum} per worker) → {fit.settings} {goal}")
                break
    workers = _workers_for_stage3(cfg, row)
    if workers is not None and workers > n:
        hints.append(f"cluster.workers: {workers} → deepspeed.stage: 3 without offload fits")
    if recommended is None and not hints:
        hints.append(f"no number of workers, micro-batch or checkpointing fits this model on "
                     f"{cfg.cluster.gpu_memory_gb:g} GiB GPUs; use larger GPUs or a smaller model")
    return hints


def _workers_for_stage3(cfg: Config, row) -> int | None:
    """Fewest workers N with ((p + g + K)·Ψ/N + gathered layer + activations) × overhead within a GPU."""
    probe = row(Layout(3), workers=1, ds=False)
    room = cfg.cluster.gpu_memory_gb * GiB / (1 + OVERHEAD) - probe.gathered - (probe.activations or 0)
    if room <= 0:
        return None  # activations alone overflow the GPU: more workers do not help
    workers = max(1, math.ceil(probe.states.gpu_bytes / room))
    while not row(Layout(3), workers=workers, ds=False).fits:  # integer rounding of the byte counts
        workers += 1
    return workers


def plan_teacher(cfg: Config, shape: ModelShape, on_gpu: bool) -> TeacherPlan:
    """Teacher inference: 2Ψ weights in bf16/fp16 on GPU (4Ψ fp32 on CPU) + one layer's activations."""
    value_bytes = 2 if on_gpu else 4
    weights = value_bytes * shape.params
    acts = None
    if shape.hidden_size:
        acts = teacher_activation_bytes(cfg.model.max_length, cfg.teacher.batch_size, shape.hidden_size,
                                        shape.heads or max(1, shape.hidden_size // 128), value_bytes)
    total = with_overhead(weights + (acts or 0))
    needed = gpus_needed(total, int(cfg.cluster.gpu_memory_gb * GiB)) if on_gpu else None
    return TeacherPlan("bf16" if on_gpu else "fp32", weights, acts, total, needed)


# ---------------------------------------------------------------------------------------------
# Rendering


def _gib(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / GiB:.2f}"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def render_plan(plan: Plan, cfg: Config) -> str:
    """The plan as fixed-width text."""
    sh, out = plan.shape, []
    add = out.append
    add("incr-ray plan: memory per GPU before anything runs (GiB = 2^30 bytes)")
    add("")
    add(f"model        {cfg.model.base}")
    add(f"parameters   Ψ = {sh.params:,} ({_count(sh.params)}) from {sh.source}")
    known = (("hidden", sh.hidden_size), ("layers", sh.layers), ("heads", sh.heads))
    dims = ", ".join(f"{k} {v}" for k, v in known if v)
    add(f"shape        {dims or 'unknown: pass --hidden-size and --layers for activation estimates'}"
        + (f"; largest layer {sh.largest_layer_params:,} params" if sh.largest_layer_params else ""))
    if plan.on_gpu:
        add(f"cluster      {plan.n_gpus} GPU workers × {cfg.cluster.gpu_memory_gb:g} GiB (cluster.workers, "
            f"cluster.gpu_memory_gb); {plan.gpus_per_node} per node, {plan.nodes} node(s)")
    else:
        add(f"cluster      {plan.n_gpus} CPU workers (cluster.use_gpu: false): figures are host memory per worker")
    add(f"precision    {plan.precision_note}")
    add(f"             model states: {plan.precision.note}")
    act_formula = ("2·s·b·h·L + one layer s·b·h·(34+5·a·s/h)  [gradient checkpointing]" if plan.checkpointing
                   else "L·s·b·h·(34+5·a·s/h)  [no checkpointing]")
    add(f"activations  s={plan.seq_len} (model.max_length), b={plan.micro_batch} (student.batch_size): "
        f"{act_formula}, Korthikanti et al. 2022")
    add("")
    per = "GPU" if plan.on_gpu else "worker"
    add(f"Student per {per}, N={plan.n_gpus} (GiB; 'total' = (states + gathered layer + activations) × "
        f"{1 + OVERHEAD:.2f})")
    header = (f"{'stage':>5}  {'offload':<16} {'states':>8} {'DS est.':>8} {'gathered':>8} {'activ.':>8} "
              f"{'total':>8}   {'CPU/node':>8} {'DS CPU':>8}  fits")
    add(header)
    add("-" * len(header))
    for r in plan.rows:
        ds_gpu = _gib(r.deepspeed.gpu_bytes) if r.deepspeed else "-"
        ds_cpu = _gib(r.deepspeed.cpu_bytes_per_node) if r.deepspeed else "-"
        fits = "-" if r.fits is None else ("yes" if r.fits else "no")
        marks = ("  <- configured" if r is plan.configured else "") + (
            "  <- recommended" if r is plan.recommended else "")
        add(f"{r.layout.stage:>5}  {r.layout.label:<16} {_gib(r.states.gpu_bytes):>8} {ds_gpu:>8} "
            f"{_gib(r.gathered) if r.layout.stage == 3 else '-':>8} {_gib(r.activations):>8} {_gib(r.total):>8}   "
            f"{_gib(r.cpu_per_node):>8} {ds_cpu:>8}  {fits}{marks}")
    add("")
    add("states: model states per GPU by the ZeRO paper; CPU/node: the offloaded states of one node's ranks.")
    add("DS est. / DS CPU: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs, per GPU (it adds an fp32 gradient")
    add("copy: 18Ψ/N) and per node (host memory incl. model-loading buffers, × 1.5; ZeRO-3 with zero.Init).")
    if plan.precision.name == "fp32":
        add("DeepSpeed's estimators assume 16-bit training; with fp32 they undercount.")
    if not sh.largest_layer_params:
        add("gathered: ZeRO-3's whole-layer gather is unknown without a model config (counted as 0).")
    if sh.hidden_size is None or sh.layers is None:
        add("activ.: unknown without --hidden-size and --layers (counted as 0): "
            "the fit check covers model states only.")
    add("")
    t = plan.teacher
    add(f"Teacher per actor (inference, {t.precision}, b={cfg.teacher.batch_size} teacher.batch_size, no KV cache)")
    add(f"  weights {2 if t.precision == 'bf16' else 4}Ψ           {_gib(t.weights):>9} GiB")
    add(f"  activations         {_gib(t.activations):>9} GiB  (one layer at a time: s·b·h·(34+5·a·s/h))")
    add(f"  total × {1 + OVERHEAD:.2f}        {_gib(t.total):>9} GiB")
    if t.gpus_needed is not None:
        fit_note = "ok" if t.gpus_needed <= cfg.teacher.gpus_per_actor else "too few"
        add(f"  GPUs per actor      {t.gpus_needed:>9}      (teacher.gpus_per_actor: {cfg.teacher.gpus_per_actor:g}, "
            f"{fit_note}; device_map_auto: {str(cfg.teacher.device_map_auto).lower()}"
            + (", should be true" if t.gpus_needed > 1 and not cfg.teacher.device_map_auto else "") + ")")
        per_actor = max(t.gpus_needed, cfg.teacher.gpus_per_actor)
        pool = cfg.teacher.pool_size * per_actor
        note = ""
        if pool > plan.n_gpus:
            note = (f"; more than the {plan.n_gpus} training GPUs: the cluster needs {pool:g}, or set "
                    f"teacher.pool_size: {max(1, int(plan.n_gpus // per_actor))}")
        add(f"  pool                {pool:>9g}      GPUs (teacher.pool_size: {cfg.teacher.pool_size}){note}")
    add("")
    for w in plan.warnings:
        add(f"WARNING: {w}")
    if plan.warnings:
        add("")
    if not plan.on_gpu:
        add(f"Recommendation: none (CPU training, no GPU budget); the configured stage needs "
            f"~{_gib(plan.configured.total * plan.n_gpus)} GiB of host memory for {plan.n_gpus} worker(s) "
            "on one machine.")
    elif plan.recommended:
        r = plan.recommended
        cpu = f", {_gib(r.cpu_per_node)} GiB CPU memory per node" if r.layout.offload_optimizer else ""
        add(f"Recommendation: {r.layout.settings}")
        add(f"  {_gib(r.total)} of {cfg.cluster.gpu_memory_gb:g} GiB per GPU{cpu}, "
            f"with cluster.workers: {plan.n_gpus}, student.batch_size: {plan.micro_batch}, "
            f"student.gradient_checkpointing: {str(plan.checkpointing).lower()}")
        if r.layout.offload_optimizer and plan.cpu_budget is None:
            add("  check the nodes' host memory (DeepSpeed's CPU estimate above), "
                "or pass --cpu-memory-gb to have it checked")
        if plan.hints:
            add("  alternatives without offload:")
    else:
        add(f"Recommendation: this will not fit on {cfg.cluster.gpu_memory_gb:g} GiB GPUs as configured, not even "
            "with ZeRO-3 and full offload. Change:")
    for h in plan.hints:
        add(f"  - {h}")
    return "\n".join(out) + "\n"


def plan_text(
    cfg: Config,
    params_override: int | None = None,
    hidden_size: int | None = None,
    layers: int | None = None,
    heads: int | None = None,
    gpus_per_node: int | None = None,
    cpu_memory_gb: float | None = None,
) -> str:
    """The whole `incr-ray plan` output for ``cfg``: see :func:`resolve_shape` for where Ψ comes from."""
    shape = resolve_shape(cfg, params_override, hidden_size, layers, heads)
    return render_plan(make_plan(cfg, shape, gpus_per_node, cpu_memory_gb), cfg)
