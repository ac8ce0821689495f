"""`incr-ray plan`'s output: a :class:`~.recommend.Plan` as fixed-width text."""

from __future__ import annotations

from ..config import Config
from .formulas import OVERHEAD, gib
from .recommend import Plan, make_plan
from .shapes import resolve_shape


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
    if sh.trainable_params is not None:
        lora = cfg.student.lora
        add(f"LoRA         r={lora.r} on {', '.join(sh.lora_targets)} + the head (student.lora): "
            f"Ψ_t = {sh.trainable_params:,} trainable ({100 * sh.trainable_params / sh.params:.2f}% of Ψ); "
            "gradients and optimizer states over Ψ_t, weights over Ψ")
    if plan.on_gpu:
        add(f"cluster      {plan.n_gpus} GPU workers × {cfg.cluster.gpu_memory_gb:g} GiB (cluster.workers, "
            f"cluster.gpu_memory_gb); {plan.gpus_per_node} per node, {plan.nodes} node(s)"
            + (f", interconnect {plan.interconnect} (cluster.interconnect: {cfg.cluster.interconnect})"
               if plan.nodes > 1 else ""))
    else:
        add(f"cluster      {plan.n_gpus} CPU workers (cluster.use_gpu: false): figures are host memory per worker")
    add(f"precision    {plan.precision_note}")
    add(f"             model states: {plan.precision.note}")
    layer = "s·b·h·34 [fused attention]" if plan.shape.fused_attention else "s·b·h·(34+5·a·s/h)"
    act_formula = (f"2·s·b·h·L + one layer {layer}  [gradient checkpointing]" if plan.checkpointing
                   else f"L·{layer}  [no checkpointing]")
    add(f"activations  s={plan.seq_len} (model.max_length), b={plan.micro_batch} (student.batch_size): "
        f"{act_formula}, Korthikanti et al. 2022")
    add("")
    per = "GPU" if plan.on_gpu else "worker"
    add(f"Student per {per}, N={plan.n_gpus} (GiB; 'total' = (states + gathered layer + activations) × "
        f"{1 + OVERHEAD:.2f})")
    header = (f"{'stage':>5}  {'offload':<16} {'states':>8} {'DS est.':>8} {'gathered':>8} {'activ.':>8} "
              f"{'total':>8}   {'CPU/node':>8} {'DS CPU':>8} {'net/step':>8}  fits")
    add(header)
    add("-" * len(header))
    for r in plan.rows:
        ds_gpu = gib(r.deepspeed.gpu_bytes) if r.deepspeed else "-"
        ds_cpu = gib(r.deepspeed.cpu_bytes_per_node) if r.deepspeed else "-"
        fits = "-" if r.fits is None else ("yes" if r.fits else "no")
        marks = ("  <- configured" if r is plan.configured else "") + (
            "  <- recommended" if r is plan.recommended else "")
        add(f"{r.layout.stage:>5}  {r.layout.label:<16} {gib(r.states.gpu_bytes):>8} {ds_gpu:>8} "
            f"{gib(r.gathered) if r.layout.stage == 3 else '-':>8} {gib(r.activations):>8} {gib(r.total):>8}   "
            f"{gib(r.cpu_per_node):>8} {ds_cpu:>8} {gib(r.network):>8}  {fits}{marks}")
    add("")
    add("states: model states per GPU by the ZeRO paper; CPU/node: the offloaded states of one node's ranks.")
    add(f"net/step: what each GPU sends per optimizer step in ZeRO's collectives (student.grad_accum: "
        f"{cfg.student.grad_accum}); " + (f"between nodes over TCP here: {plan.slow_network}." if plan.slow_network
                                           else "it crosses the network only between nodes (--gpus-per-node)."))
    add("DS est. / DS CPU: DeepSpeed's estimate_zero2/zero3_model_states_mem_needs, per GPU (it adds an fp32 gradient")
    add("copy: 18Ψ/N) and per node (host memory incl. model-loading buffers, × 1.5; ZeRO-3 with zero.Init).")
    if sh.trainable_params is not None:
        add("DS est. is left out under LoRA: DeepSpeed's estimators assume every parameter trains.")
    elif plan.precision.name == "fp32":
        add("DeepSpeed's estimators assume 16-bit training; with fp32 they undercount.")
    if not sh.largest_layer_params:
        add("gathered: ZeRO-3's whole-layer gather is unknown without a model config (counted as 0).")
    if sh.hidden_size is None or sh.layers is None:
        add("activ.: unknown without --hidden-size and --layers (counted as 0): "
            "the fit check covers model states only.")
    add("")
    t = plan.teacher
    add(f"Teacher per actor (inference, {t.precision}, b={cfg.teacher.batch_size} teacher.batch_size, no KV cache)")
    if t.members > 1:
        add(f"  weights {t.members}×{2 if t.precision == 'bf16' else 4}Ψ         {gib(t.weights):>9} GiB  "
            f"(teacher.ensemble: {t.members} models per actor)")
    else:
        add(f"  weights {2 if t.precision == 'bf16' else 4}Ψ           {gib(t.weights):>9} GiB")
    layer = "s·b·h·34, fused attention" if plan.shape.fused_attention else "s·b·h·(34+5·a·s/h)"
    add(f"  activations         {gib(t.activations):>9} GiB  (one layer at a time: {layer})")
    add(f"  total × {1 + OVERHEAD:.2f}        {gib(t.total):>9} GiB")
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
    if cfg.deepspeed.stage == "auto":
        offload = plan.configured.layout.offload_optimizer and not cfg.deepspeed.offload_optimizer
        add(f"deepspeed.stage auto -> ZeRO-{plan.configured.layout.stage}"
            f"{' with optimizer offload' if offload else ''}: {plan.stage_reason}")
        add("")
    for w in plan.warnings:
        add(f"WARNING: {w}")
    if plan.warnings:
        add("")
    if not plan.on_gpu:
        add(f"Recommendation: none (CPU training, no GPU budget); the configured stage needs "
            f"~{gib(plan.configured.total * plan.n_gpus)} GiB of host memory for {plan.n_gpus} worker(s) "
            "on one machine.")
    elif plan.recommended:
        r = plan.recommended
        cpu = f", {gib(r.cpu_per_node)} GiB CPU memory per node" if r.layout.offload_optimizer else ""
        add(f"Recommendation: {r.layout.settings}")
        add(f"  {gib(r.total)} of {cfg.cluster.gpu_memory_gb:g} GiB per GPU{cpu}, "
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
