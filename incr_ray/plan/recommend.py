"""The plan: every ZeRO layout's memory per GPU and traffic per step for a config and model, the
layout to use, the teacher's GPUs, and what to change when nothing fits."""

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
    network_bytes,
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
    network: int = 0  # bytes each GPU sends per optimizer step (formulas.network_bytes)


@dataclass(frozen=True)
class TeacherPlan:
    precision: str
    weights: int  # of every model an actor holds (teacher.ensemble of them)
    activations: int | None
    total: int
    gpus_needed: int | None
    members: int = 1


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
    interconnect: str = "fast"  # between the nodes: "fast" or "tcp" (cluster.interconnect, resolved)
    slow_network: str = ""  # set when the workers span nodes without a fast interconnect: says so
    hints: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def student_row(
    shape: ModelShape, layout: Layout, precision: Precision, n_gpus: int, gpus_per_node: int, nodes: int,
    seq_len: int, micro_batch: int, checkpointing: bool, gpu_budget: int | None, cpu_budget: int | None,
    with_deepspeed: bool = True, grad_accum: int = 1, reduce_bytes: int | None = None,
) -> StudentRow:
    states = zero_model_states(shape.params, n_gpus, layout, precision, shape.trainable_params)
    network = network_bytes(shape.params, n_gpus, layout, precision, grad_accum, shape.trainable_params,
                            reduce_bytes)
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
    return StudentRow(layout, states, ds, gathered, acts, total, cpu_per_node, fits, network)


def configured_layout(cfg: Config, on_gpu: bool, precision: str, rows: list[StudentRow] | None,
                      slow_network: str = "") -> tuple[Layout, str]:
    """The layout the deepspeed section trains with, and why; ``deepspeed.stage: auto`` decided here.

    One worker partitions nothing, so ZeRO only costs time there: stage 0, or stage 1 in 16-bit
    precision (DeepSpeed keeps fp32 master weights only with ZeRO). Several GPU workers take the
    first stage whose plan (``rows``) fits ``cluster.gpu_memory_gb`` with the configured offload
    switches, ZeRO-3 when none does; several CPU workers stage 2.

    ``slow_network`` (set when the workers span nodes without a fast interconnect; it says so)
    orders the candidates by what each GPU sends per step instead (``StudentRow.network``, ties
    keeping the order above) and, with no offload configured, adds ZeRO-2 with optimizer offload:
    it sends what ZeRO-2 sends, (A + 1)·p·Ψ per step, where ZeRO-3 sends 3·A·p·Ψ, at the price of
    CPU Adam steps. Over a fast interconnect ZeRO-3 is the better trade, and it stays before offload.
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
    if slow_network:
        if flags == (False, False):
            mine += [r for r in rows if r.layout == Layout(2, offload_optimizer=True)]
        mine.sort(key=lambda r: r.network)  # stable: equal traffic keeps fewest moving parts first
    fitting = next((r for r in mine if r.fits), None)
    budget = f"{cfg.cluster.gpu_memory_gb:g} GiB per GPU"
    if fitting is None:
        return Layout(3, *flags), (f"nothing fits {budget} by the plan: ZeRO-3, the smallest (incr-ray plan shows "
                                   "what to change)" + (f"; {slow_network}" if slow_network else ""))
    layout = Layout(1) if fitting.layout == Layout(0) and precision != "fp32" else fitting.layout
    if not slow_network:
        return layout, f"the first stage whose plan fits {budget} ({gib(fitting.total)} GiB)"
    why = (f"{slow_network}: of the layouts that fit {budget} it sends the least between nodes, "
           f"{gib(fitting.network)} GiB per GPU per step")
    if layout.offload_optimizer and not flags[0]:
        stage3 = next(r for r in rows if r.layout == Layout(3))
        why += (f" (ZeRO-3: {gib(stage3.network)}); the offloaded optimizer takes {gib(fitting.states.cpu_bytes)} GiB "
                "of host memory per worker")
    return layout, why


def auto_layout(cfg: Config, on_gpu: bool, precision: str, shape: ModelShape | None,
                gpus_per_node: int | None = None, interconnect: str | None = None) -> tuple[Layout, str]:
    """The ZeRO layout ``deepspeed.stage: auto`` trains with, and why (printed and recorded): the
    stage, and optimizer offload where the workers span nodes without a fast interconnect and
    offload is what lets ZeRO-2 fit (:func:`configured_layout`). ``shape`` is needed only for
    several GPU workers; ``gpus_per_node`` (None: all on one node) and ``interconnect`` ("fast" or
    "tcp"; None: ``cluster.interconnect``, with ``auto`` taken as tcp) are what the cluster has."""
    if on_gpu and cfg.cluster.workers > 1:
        if shape is None:
            raise ModelError("deepspeed.stage auto needs the model's shape to choose a stage for several GPUs; "
                             "set deepspeed.stage (incr-ray plan --params N shows which fits)")
        plan = make_plan(cfg, shape, gpus_per_node, with_deepspeed=False, interconnect=interconnect)
        return plan.configured.layout, plan.stage_reason
    return configured_layout(cfg, on_gpu, precision, None)


def auto_stage(cfg: Config, on_gpu: bool, precision: str, shape: ModelShape | None,
               gpus_per_node: int | None = None, interconnect: str | None = None) -> tuple[int, str]:
    """The stage of :func:`auto_layout`, and why."""
    layout, why = auto_layout(cfg, on_gpu, precision, shape, gpus_per_node, interconnect)
    return layout.stage, why


def make_plan(
    cfg: Config, shape: ModelShape, gpus_per_node: int | None = None, cpu_memory_gb: float | None = None,
    with_deepspeed: bool = True, interconnect: str | None = None,
) -> Plan:
    """Work out every row, the recommendation, the warnings and the hints for ``cfg`` and ``shape``.

    ``gpus_per_node`` None puts every worker on one node. ``interconnect`` is the network between
    nodes, "fast" or "tcp"; None takes ``cluster.interconnect``, where ``auto`` (no cluster to ask)
    counts as tcp."""
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
    # Gradients are summed across workers in fp32 by default (deepspeed.grad_reduce_dtype).
    reduce_bytes = 4 if cfg.deepspeed.grad_reduce_dtype == "fp32" else precision.grad_bytes
    gpu_budget = int(cfg.cluster.gpu_memory_gb * GiB) if on_gpu else None
    cpu_budget = int(cpu_memory_gb * GiB) if cpu_memory_gb else None
    s, b, ckpt = cfg.model.max_length, cfg.student.batch_size, cfg.student.gradient_checkpointing

    def row(layout: Layout, micro_batch: int = b, checkpointing: bool = ckpt, workers: int = n, ds: bool = True):
        return student_row(shape, layout, precision, workers, min(gpn, workers), math.ceil(workers / gpn),
                           s, micro_batch, checkpointing, gpu_budget, cpu_budget, ds and with_deepspeed,
                           cfg.student.grad_accum, reduce_bytes)

    setting = cfg.cluster.interconnect
    fabric = interconnect or ("tcp" if setting == "auto" else setting)
    slow_network = ""
    if on_gpu and nodes > 1 and fabric != "fast":
        said = setting if setting == fabric else f"{setting} -> {fabric}"
        slow_network = f"{n} workers on {nodes} nodes without a fast interconnect (cluster.interconnect: {said})"

    rows = [row(layout) for layout in TABLE_LAYOUTS]
    by_layout = {r.layout: r for r in rows}
    order = RECOMMENDATION_ORDER
    if slow_network:  # what sends the least between nodes first; ZeRO-2 with offload sends what ZeRO-2 does
        order = sorted(order + (Layout(2, offload_optimizer=True),), key=lambda lay: by_layout[lay].network)
    recommended = next((by_layout[lay] for lay in order if by_layout[lay].fits), None)
    layout, stage_reason = configured_layout(cfg, on_gpu, prec_name, rows, slow_network)
    configured = by_layout.get(layout) or row(layout)  # e.g. parameter offload alone: not a table row
    teacher = plan_teacher(cfg, shape, on_gpu)

    plan = Plan(shape, precision, why, n, gpn, nodes, on_gpu, gpu_budget, cpu_budget, s, b, ckpt, rows,
                configured, recommended, teacher, stage_reason=stage_reason, interconnect=fabric,
                slow_network=slow_network)
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
    if (slow_network and configured.fits and recommended and configured.layout.stage == 3
            and recommended.network < configured.network):
        plan.warnings.append(
            f"the configured {configured.layout.description} sends {gib(configured.network)} GiB per GPU per step "
            f"between nodes ({slow_network}); {recommended.layout.settings} fits and sends "
            f"{gib(recommended.network)} GiB (or give the nodes EFA: cluster.yaml)")

    if recommended is None or recommended.layout.offload_optimizer:
        plan.hints.extend(_hints(shape, cfg, row, recommended, bool(slow_network)))
    return plan


def _hints(shape: ModelShape, cfg: Config, row, recommended: StudentRow | None,
           slow_network: bool = False) -> list[str]:
    """What to change when nothing fits, or when only offload does.

    ``row(layout, micro_batch=, checkpointing=, workers=, ds=)`` evaluates one variation of the config.
    With ``slow_network`` (workers on several nodes over TCP) offload is there to avoid ZeRO-3, so
    its alternatives stop at stage 2.
    """
    hints = []
    b, accum, n = cfg.student.batch_size, cfg.student.grad_accum, cfg.cluster.workers
    without_offload = RECOMMENDATION_ORDER[:3] if slow_network else RECOMMENDATION_ORDER[:4]
    candidates = RECOMMENDATION_ORDER if recommended is None else without_offload
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
    workers = None if slow_network and recommended is not None else _workers_for_stage3(cfg, row)
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
    """Teacher inference: 2Ψ weights in bf16/fp16 on GPU (4Ψ fp32 on CPU) per model the actor holds
    (``teacher.ensemble`` N of them) + one layer's activations (the members run one after another)."""
    value_bytes = 2 if on_gpu else 4
    members = cfg.teacher.ensemble
    weights = members * value_bytes * shape.params
    acts = None
    if shape.hidden_size:
        # A batch runs in length-sorted forwards of at most teacher.forward_tokens padded tokens.
        rows = max(1, min(cfg.teacher.batch_size, cfg.teacher.tokens_per_forward(on_gpu) // cfg.model.max_length))
        acts = teacher_activation_bytes(cfg.model.max_length, rows, shape.hidden_size,
                                        shape.heads or max(1, shape.hidden_size // 128), value_bytes,
                                        shape.fused_attention)
    total = with_overhead(weights + (acts or 0))
    needed = gpus_needed(total, int(cfg.cluster.gpu_memory_gb * GiB)) if on_gpu else None
    return TeacherPlan("bf16" if on_gpu else "fp32", weights, acts, total, needed, members)


def ensemble_memory_problem(cfg: Config, teacher: TeacherPlan) -> str | None:
    """Why a scoring actor's GPUs cannot hold the ``teacher.ensemble`` members ``teacher`` plans
    for (None: they can, or there is no ensemble, or the actors score on CPU).

    Each actor holds every member, so a batch is tokenized once and scored in one pass; the cost is
    N × the weights. An actor has one GPU's memory (its share, at fractional ``gpus_per_actor``), or
    its GPUs' with ``device_map_auto``. One teacher that does not fit stays a plan warning, as before
    ensembles; N that do not is refused, naming how many would fit."""
    t, n = cfg.teacher, teacher.members
    if n < 2 or teacher.gpus_needed is None or t.gpus_per_actor <= 0:
        return None
    gpus = t.gpus_per_actor if t.device_map_auto else min(t.gpus_per_actor, 1.0)
    room = gpus * cfg.cluster.gpu_memory_gb * GiB
    if teacher.total <= room:
        return None
    fit = int((room / (1 + OVERHEAD) - (teacher.activations or 0)) // (teacher.weights / n))
    return (f"teacher.ensemble {n} holds {n} teacher models in every scoring actor (~{gib(teacher.total)} GiB) but an "
            f"actor has {gib(room)} GiB (teacher.gpus_per_actor {t.gpus_per_actor:g} × cluster.gpu_memory_gb "
            f"{cfg.cluster.gpu_memory_gb:g}" + ("" if t.device_map_auto else ", one GPU without device_map_auto")
            + f"); set teacher.ensemble: {max(1, fit)}"
            + ", or give each actor more GPUs (teacher.gpus_per_actor with teacher.device_map_auto: true)")

