"""The plan: every ZeRO layout's memory per GPU for a config and model, the layout to use, the
teacher's GPUs, and what to change when nothing fits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import Config
from .formulas import (
    GiB,
    OVERHEAD,
    DeepSpeedEstimate,
    Layout,
    ModelStates,
    Precision,
    activation_bytes,
    deepspeed_estimate,
    gib,
    gpus_needed,
    stage3_gather_bytes,
    teacher_activation_bytes,
    training_precision,
    with_overhead,
    zero_model_states,
)
from ..modeling import ModelError
from .shapes import ModelShape

# The order a recommendation tries them in: fewest moving parts first, offload last.
RECOMMENDATION_ORDER = (Layout(0), Layout(1), Layout(2), Layout(3), Layout(3, True), Layout(3, True, True))
# Rows of the printed table: the above plus ZeRO-Offload at stage 2, for comparison.
TABLE_LAYOUTS = (Layout(0), Layout(1), Layout(2), Layout(2, True), Layout(3), Layout(3, True), Layout(3, True, True))


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
    stage_reason: str = ""  # why the configured layout: "deepspeed.stage", or what `auto` decided
    hints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def student_row(
    shape: ModelShape, layout: Layout, precision: Precision, n_gpus: int, gpus_per_node: int, nodes: int,
    seq_len: int, micro_batch: int, checkpointing: bool, gpu_budget: int | None, cpu_budget: int | None,
    with_deepspeed: bool = True,
) -> StudentRow:
    states = zero_model_states(shape.params, n_gpus, layout, precision, shape.trainable_params)
    gathered = stage3_gather_bytes(shape.largest_layer_params, layout, precision)
    acts = None
    if shape.hidden_size and shape.layers:
        acts = activation_bytes(seq_len, micro_batch, shape.hidden_size, shape.layers,
                                shape.heads or max(1, shape.hidden_size // 128), checkpointing,
                                precision.activation_bytes, shape.fused_attention)
    total = with_overhead(states.gpu_bytes + gathered + (acts or 0))
    cpu_per_node = states.cpu_bytes * gpus_per_node
    ds = None
    if with_deepspeed and shape.trainable_params is None:  # its estimators assume every weight trains
        try:
            ds = deepspeed_estimate(shape.params, shape.largest_layer_params, gpus_per_node, nodes, layout)
        except Exception:  # noqa: BLE001 - DeepSpeed missing or changed: the plan stands without it
            ds = None
    fits = None
    if gpu_budget is not None:
        fits = total <= gpu_budget and (cpu_budget is None or cpu_per_node <= cpu_budget)
    return StudentRow(layout, states, ds, gathered, acts, total, cpu_per_node, fits)


def configured_layout(cfg: Config, on_gpu: bool, precision: str, rows: list[StudentRow] | None) -> tuple[Layout, str]:
    """The layout the deepspeed section trains with, and why; ``deepspeed.stage: auto`` decided here.

    One worker partitions nothing, so ZeRO only costs time there: stage 0, or stage 1 in 16-bit
    precision (DeepSpeed keeps fp32 master weights only with ZeRO). Several GPU workers take the
    first stage whose plan (``rows``) fits ``cluster.gpu_memory_gb`` with the configured offload
    switches, ZeRO-3 when none does; several CPU workers stage 2.
    """
    ds = cfg.deepspeed
    flags = (ds.offload_optimizer, ds.offload_params)
    if ds.stage != "auto":
        return Layout(ds.stage, *flags), "deepspeed.stage"
    if ds.offload_params:
        return Layout(3, *flags), "deepspeed.offload_params needs stage 3"
    if ds.offload_optimizer and (cfg.cluster.workers == 1 or not on_gpu):
        return Layout(2, *flags), "deepspeed.offload_optimizer needs stage 2"
    if cfg.cluster.workers == 1:
        if precision == "fp32":
            return Layout(0), "one worker: nothing to partition"
        return Layout(1), f"one worker in {precision}: ZeRO-1 keeps fp32 master weights at stage 0's memory"
    if not on_gpu:
        return Layout(2), f"{cfg.cluster.workers} CPU workers"
    mine = [r for r in rows if (r.layout.offload_optimizer, r.layout.offload_params) == flags]
    fitting = next((r for r in mine if r.fits), None)
    if fitting is None:
        return Layout(3, *flags), (f"nothing fits {cfg.cluster.gpu_memory_gb:g} GiB per GPU by the plan: ZeRO-3, "
                                   "the smallest (incr-ray plan shows what to change)")
    layout = Layout(1) if fitting.layout == Layout(0) and precision != "fp32" else fitting.layout
    return layout, (f"the first stage whose plan fits {cfg.cluster.gpu_memory_gb:g} GiB per GPU "
                    f"({gib(fitting.total)} GiB)")


def auto_stage(cfg: Config, on_gpu: bool, precision: str, shape: ModelShape | None) -> tuple[int, str]:
    """The ZeRO stage ``deepspeed.stage: auto`` trains with, and why (printed and recorded).
    ``shape`` is needed only for several GPU workers."""
    if on_gpu and cfg.cluster.workers > 1:
        if shape is None:
            raise ModelError("deepspeed.stage auto needs the model's shape to choose a stage for several GPUs; "
                             "set deepspeed.stage (incr-ray plan --params N shows which fits)")
        plan = make_plan(cfg, shape, with_deepspeed=False)
        return plan.configured.layout.stage, plan.stage_reason
    layout, why = configured_layout(cfg, on_gpu, precision, None)
    return layout.stage, why


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
    recommended = next((by_layout[lay] for lay in RECOMMENDATION_ORDER if by_layout[lay].fits), None)
    layout, stage_reason = configured_layout(cfg, on_gpu, prec_name, rows)
    configured = by_layout[layout]
    teacher = plan_teacher(cfg, shape, on_gpu)

    plan = Plan(shape, precision, why, n, gpn, nodes, on_gpu, gpu_budget, cpu_budget, s, b, ckpt, rows,
                configured, recommended, teacher, stage_reason=stage_reason)
    if not on_gpu:
        return plan

    budget_gib = cfg.cluster.gpu_memory_gb
    if not configured.fits:
        where = (f"{gib(configured.total)} GiB per GPU > {budget_gib:g} GiB (cluster.gpu_memory_gb)"
                 if configured.total > gpu_budget else
                 f"{gib(configured.cpu_per_node)} GiB of CPU memory per node > {cpu_memory_gb:g} GiB "
                 "(--cpu-memory-gb)")
        plan.warnings.append(
            f"the configured {configured.layout.description} (deepspeed section) will not fit: "
            f"{where}; " + (f"use {recommended.layout.settings}" if recommended else "see the hints below"))
    if teacher.gpus_needed is not None and teacher.gpus_needed > cfg.teacher.gpus_per_actor:
        plan.warnings.append(
            f"the teacher needs {teacher.gpus_needed} GPUs per actor (~{gib(teacher.total)} GiB) but "
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
                                        shape.heads or max(1, shape.hidden_size // 128), value_bytes,
                                        shape.fused_attention)
    total = with_overhead(weights + (acts or 0))
    needed = gpus_needed(total, int(cfg.cluster.gpu_memory_gb * GiB)) if on_gpu else None
    return TeacherPlan("bf16" if on_gpu else "fp32", weights, acts, total, needed)

