"""The plan's recommendation, warnings and hints for hand-computed cases, and how they are printed.

GB below means 1e9 bytes (the hand computations), GiB 2**30 (what the plan prints).
"""

from __future__ import annotations

import pytest

from incr_ray.config import config_from_dict
from incr_ray.modeling import ModelError
from incr_ray.plan.formulas import Layout
from incr_ray.plan.recommend import make_plan
from incr_ray.plan.render import render_plan
from incr_ray.plan.shapes import ModelShape

GB = 1e9
PSI = 7_000_000_000


def cfg(**sections):
    return config_from_dict(sections)


def plan_for(shape, **sections):
    return make_plan(cfg(**sections), shape, with_deepspeed=False)


def test_recommends_the_lowest_stage_that_fits():
    shape = ModelShape(PSI, "test")
    plan = plan_for(shape, cluster={"workers": 8, "gpu_memory_gb": 80})
    # stage 0: 112 GB × 1.1 = 123.2 GB > 80 GiB (85.9 GB); stage 1: 38.5 × 1.1 = 42.35 GB fits.
    assert plan.recommended.layout == Layout(1)
    assert plan.recommended.total == int(38.5 * GB * 1.1)
    assert not plan.warnings  # the default config is stage 2, which fits
    assert not plan.hints


def test_falls_back_to_offload_and_says_how_many_workers_avoid_it():
    shape = ModelShape(PSI, "test")
    plan = plan_for(shape, cluster={"workers": 8, "gpu_memory_gb": 10}, deepspeed={"stage": 2})
    # stage 3: 14 GB × 1.1 = 15.4 GB > 10 GiB; + optimizer offload: 1.75 × 1.1 = 1.925 GB fits.
    assert plan.recommended.layout == Layout(3, offload_optimizer=True)
    # Stage 3 without offload: 112 GB · 1.1 / N ≤ 10 GiB ⇔ N ≥ 11.47.
    assert "cluster.workers: 12 → deepspeed.stage: 3 without offload fits" in plan.hints
    assert any("configured ZeRO stage 2 with no offload" in w for w in plan.warnings)


def test_cpu_memory_limit_rules_out_offload():
    shape = ModelShape(PSI, "test")
    plan = make_plan(cfg(cluster={"workers": 8, "gpu_memory_gb": 10}), shape, cpu_memory_gb=50, with_deepspeed=False)
    # Optimizer offload needs 12.25 GB per rank × 8 ranks = 98 GB > 50 GiB on the one node.
    assert plan.recommended is None
    plan = make_plan(cfg(cluster={"workers": 8, "gpu_memory_gb": 10}), shape, gpus_per_node=2, cpu_memory_gb=50,
                     with_deepspeed=False)
    assert plan.recommended.layout == Layout(3, offload_optimizer=True)  # 2 ranks per node: 24.5 GB


def test_nothing_fits_lists_what_to_change():
    shape = ModelShape(PSI, "test", hidden_size=4096, layers=32, heads=32)
    sections = dict(cluster={"workers": 8, "gpu_memory_gb": 20}, model={"max_length": 512},
                    student={"batch_size": 8})
    plan = plan_for(shape, **sections)
    # Activations alone: 32 · 512·8·4096 · (34 + 5·32·512/4096) = 28.99 GB; × 1.1 > 20 GiB.
    assert plan.rows[-1].activations == 32 * 512 * 8 * 4096 * 54
    assert plan.recommended is None
    text = render_plan(plan, cfg(**sections))
    assert "will not fit on 20 GiB GPUs" in text
    assert any(h.startswith("student.gradient_checkpointing: true") for h in plan.hints)
    # b = 4 (of the batch of 8) is the largest divisor whose activations fit: 14.5 GB × 1.1.
    assert any(h.startswith("student.batch_size: 4 with student.grad_accum: 2 (same batch of 8")
               for h in plan.hints)
    # More workers cannot shrink activations, so none is suggested.
    assert not any(h.startswith("cluster.workers") for h in plan.hints)


def test_warns_when_the_configured_stage_does_not_fit():
    text = render_plan(plan_for(ModelShape(PSI, "test"), cluster={"workers": 8}, deepspeed={"stage": 0}),
                       cfg(cluster={"workers": 8}, deepspeed={"stage": 0}))
    warning = [line for line in text.splitlines() if line.startswith("WARNING:")]
    assert len(warning) == 1
    assert "ZeRO stage 0 with no offload" in warning[0] and "114.74 GiB per GPU > 80 GiB" in warning[0]
    assert "use deepspeed.stage: 1" in warning[0]


def test_teacher_larger_than_one_gpu():
    shape = ModelShape(70_000_000_000, "test", hidden_size=8192, layers=80, heads=64)
    plan = plan_for(shape, cluster={"workers": 8}, teacher={"pool_size": 8})
    assert plan.teacher.weights == 140 * GB
    assert plan.teacher.gpus_needed == 2
    assert any("teacher.gpus_per_actor: 2 and teacher.device_map_auto: true" in w for w in plan.warnings)
    text = render_plan(plan, cfg(cluster={"workers": 8}, teacher={"pool_size": 8}))
    assert "the cluster needs 16, or set teacher.pool_size: 4" in text
    plan = plan_for(shape, cluster={"workers": 8}, teacher={"gpus_per_actor": 2, "device_map_auto": True})
    assert not any("teacher" in w for w in plan.warnings)


def test_cpu_training_is_fp32_with_no_gpu_check():
    plan = plan_for(ModelShape(PSI, "test"), cluster={"use_gpu": False, "workers": 2})
    assert plan.precision.name == "fp32" and plan.recommended is None and not plan.warnings
    assert all(r.fits is None for r in plan.rows)
    assert plan.teacher.weights == 4 * PSI


def test_stage_auto():
    """One worker: no ZeRO (ZeRO-1 in 16 bits, for the fp32 master weights); several GPUs: the first
    stage that fits; several CPU workers: stage 2; offload switches pin the stage they need."""
    from incr_ray.plan.recommend import auto_stage

    shape = ModelShape(PSI, "test")  # 7e9 parameters
    assert auto_stage(cfg(), on_gpu=False, precision="fp32", shape=None)[0] == 0
    assert auto_stage(cfg(), on_gpu=True, precision="bf16", shape=None)[0] == 1
    assert auto_stage(cfg(cluster={"workers": 2}), on_gpu=False, precision="fp32", shape=None)[0] == 2
    assert auto_stage(cfg(deepspeed={"offload_params": True}), on_gpu=True, precision="bf16", shape=None)[0] == 3
    # 8 × 80 GiB: stage 0 needs 123 GB per GPU, stage 1 fits (as in test_recommends_the_lowest_stage_that_fits).
    stage, why = auto_stage(cfg(cluster={"workers": 8, "gpu_memory_gb": 80}), True, "bf16", shape)
    assert stage == 1 and "fits 80 GiB" in why
    # 8 × 10 GiB: nothing fits without offload: ZeRO-3, said so.
    stage, why = auto_stage(cfg(cluster={"workers": 8, "gpu_memory_gb": 10}), True, "bf16", shape)
    assert stage == 3 and "nothing fits" in why
    with pytest.raises(ModelError, match="needs the model's shape"):
        auto_stage(cfg(cluster={"workers": 8}), True, "bf16", None)


def test_stage_auto_without_a_fast_interconnect_prefers_what_moves_least_between_nodes():
    """7e9 parameters, 8 workers on 24 GiB GPUs, 4 micro-batches per step (hand-made, no
    activations): ZeRO-2 needs 3.75Ψ = 26.25 GB × 1.1 = 28.9 GB > 24 GiB (25.8 GB), while ZeRO-3
    and ZeRO-2 with optimizer offload both need 2Ψ = 14 GB × 1.1 = 15.4 GB. Over a fast network (or
    on one node) auto keeps ZeRO-3; across nodes over TCP ZeRO-3 would send A·(2·p·Ψ + g·Ψ)·7/8 = 196 GB
    per GPU per step (g = 4: gradients summed in fp32, deepspeed.grad_reduce_dtype's default), ZeRO-2
    with offload (A·g + p)·Ψ·7/8 = 110.25 GB, so auto offloads instead."""
    from incr_ray.plan.recommend import auto_layout, auto_stage

    shape = ModelShape(PSI, "test")
    sections = dict(cluster={"workers": 8, "gpu_memory_gb": 24}, student={"grad_accum": 4})
    config = cfg(**sections)
    offload = Layout(2, offload_optimizer=True)

    layout, why = auto_layout(config, True, "bf16", shape, gpus_per_node=4, interconnect="fast")
    assert layout == Layout(3) and "the first stage whose plan fits 24 GiB" in why
    layout, why = auto_layout(config, True, "bf16", shape, gpus_per_node=4, interconnect="tcp")
    assert layout == offload
    assert "8 workers on 2 nodes without a fast interconnect (cluster.interconnect: auto -> tcp)" in why
    assert "sends the least between nodes, 102.68 GiB per GPU per step (ZeRO-3: 182.54)" in why  # 110.25, 196 GB
    assert "12.25" not in why and "11.41 GiB of host memory per worker" in why  # 14Ψ/8 = 12.25 GB
    assert auto_stage(config, True, "bf16", shape, gpus_per_node=4, interconnect="tcp")[0] == 2
    # One node: the network between nodes carries nothing, whatever it is.
    assert auto_layout(config, True, "bf16", shape, gpus_per_node=8, interconnect="tcp")[0] == Layout(3)
    assert auto_layout(config, True, "bf16", shape, interconnect="tcp")[0] == Layout(3)  # no gpus_per_node: one node
    # The setting itself, when the caller has no cluster to ask: auto counts as tcp.
    tcp = cfg(**{**sections, "cluster": {**sections["cluster"], "interconnect": "tcp"}})
    fast = cfg(**{**sections, "cluster": {**sections["cluster"], "interconnect": "fast"}})
    assert auto_layout(tcp, True, "bf16", shape, gpus_per_node=4)[0] == offload
    assert auto_layout(fast, True, "bf16", shape, gpus_per_node=4)[0] == Layout(3)
    assert auto_layout(config, True, "bf16", shape, gpus_per_node=4)[0] == offload
    # When a stage below 3 fits, it also sends the least: the same choice either way.
    roomy = cfg(cluster={"workers": 8, "gpu_memory_gb": 80}, student={"grad_accum": 4})
    for fabric in ("fast", "tcp"):
        assert auto_layout(roomy, True, "bf16", shape, gpus_per_node=4, interconnect=fabric)[0] == Layout(1)
    # Parameter offload asked for pins ZeRO-3; optimizer offload asked for keeps its order (2 first).
    pinned = cfg(**{**sections, "deepspeed": {"offload_params": True}})
    assert auto_layout(pinned, True, "bf16", shape, gpus_per_node=4, interconnect="tcp")[0] == Layout(3, False, True)
    asked = cfg(**{**sections, "deepspeed": {"offload_optimizer": True}})
    assert auto_layout(asked, True, "bf16", shape, gpus_per_node=4, interconnect="tcp")[0] == offload
    # Nothing fits even with offload: ZeRO-3, and the reason names the slow network.
    tiny = cfg(cluster={"workers": 8, "gpu_memory_gb": 10}, student={"grad_accum": 4})
    layout, why = auto_layout(tiny, True, "bf16", shape, gpus_per_node=4, interconnect="tcp")
    assert layout == Layout(3) and "nothing fits" in why and "without a fast interconnect" in why


def test_plan_shows_the_traffic_and_warns_of_zero_3_over_tcp():
    shape = ModelShape(PSI, "test")
    sections = dict(cluster={"workers": 8, "gpu_memory_gb": 24, "interconnect": "tcp"}, student={"grad_accum": 4},
                    deepspeed={"stage": 3})
    plan = make_plan(cfg(**sections), shape, gpus_per_node=4, with_deepspeed=False)
    assert plan.recommended.layout == Layout(2, offload_optimizer=True)
    assert plan.slow_network and plan.interconnect == "tcp"
    assert any("configured ZeRO stage 3 with no offload sends 182.54 GiB per GPU per step between nodes" in w
               for w in plan.warnings)
    text = render_plan(plan, cfg(**sections))
    assert "net/step" in text and "2 node(s), interconnect tcp (cluster.interconnect: tcp)" in text
    row = next(line for line in text.splitlines() if line.startswith("    3  -  "))
    assert row.split()[9:11] == ["182.54", "yes"]  # net/step, fits
    # Over a fast interconnect the same plan recommends ZeRO-3 and warns of nothing.
    fast = dict(sections, cluster={**sections["cluster"], "interconnect": "fast"})
    plan = make_plan(cfg(**fast), shape, gpus_per_node=4, with_deepspeed=False)
    assert plan.recommended.layout == Layout(3) and not plan.slow_network and not plan.warnings
    # auto: the chosen offload is printed with the stage.
    auto = dict(sections, deepspeed={"stage": "auto"})
    text = render_plan(make_plan(cfg(**auto), shape, gpus_per_node=4, with_deepspeed=False), cfg(**auto))
    assert "deepspeed.stage auto -> ZeRO-2 with optimizer offload: 8 workers on 2 nodes" in text



def test_an_ensemble_holds_every_member_in_each_actor():
    """teacher.ensemble N: each scoring actor holds N models (N × the weights, one layer's
    activations: the members run one after another). N that do not fit an actor are refused with
    how many would; one teacher that does not fit stays the plan's warning."""
    from incr_ray.plan.recommend import ensemble_memory_problem

    shape = ModelShape(PSI, "test", hidden_size=4096, layers=32, heads=32)
    one, three = plan_for(shape).teacher, plan_for(shape, teacher={"ensemble": 3}).teacher
    assert (three.members, three.weights) == (3, 3 * one.weights) and one.weights == 14 * GB
    assert three.activations == one.activations
    assert ensemble_memory_problem(cfg(teacher={"ensemble": 3}), three) is None  # ~44 GiB of 80

    six = plan_for(shape, teacher={"ensemble": 6}).teacher
    problem = ensemble_memory_problem(cfg(teacher={"ensemble": 6}), six)
    assert problem.startswith("teacher.ensemble 6 holds 6 teacher models in every scoring actor "
                              f"(~{six.total / 2**30:.2f} GiB) but an actor has 80.00 GiB (teacher.gpus_per_actor 1 × cluster.gpu_memory_gb 80, "
                              "one GPU without device_map_auto); set teacher.ensemble: 5, or give each actor more GPUs")
    assert "\n" not in problem
    assert plan_for(shape, teacher={"ensemble": 5}).teacher.total <= 80 * 2**30  # the number it names fits
    spread = {"ensemble": 6, "gpus_per_actor": 2, "device_map_auto": True}
    assert ensemble_memory_problem(cfg(teacher=spread), plan_for(shape, teacher=spread).teacher) is None
    cpu = {"cluster": {"use_gpu": False}, "teacher": {"ensemble": 6}}
    assert ensemble_memory_problem(cfg(**cpu), plan_for(shape, **cpu).teacher) is None  # CPU actors: not judged
    big = ModelShape(70_000_000_000, "test", hidden_size=8192, layers=80, heads=64)
    assert ensemble_memory_problem(cfg(), plan_for(big).teacher) is None  # one teacher: the plan warns

    text = render_plan(plan_for(shape, teacher={"ensemble": 6}), cfg(teacher={"ensemble": 6}))
    assert "weights 6×2Ψ" in text and "(teacher.ensemble: 6 models per actor)" in text


def test_preflight_refuses_an_ensemble_its_actors_cannot_hold():
    from incr_ray.config import ConfigError
    from incr_ray.run.preflight import check_ensemble_memory

    small_gpu = {"cluster": {"use_gpu": True, "gpu_memory_gb": 0.05}}
    check_ensemble_memory(cfg(**small_gpu))  # one MiniLM (46 MB in bf16) fits
    with pytest.raises(ConfigError, match=r"^teacher.ensemble 2 holds 2 teacher models .* set teacher.ensemble: 1"):
        check_ensemble_memory(cfg(teacher={"ensemble": 2}, **small_gpu))
    check_ensemble_memory(cfg(teacher={"ensemble": 2}, cluster={"use_gpu": False, "gpu_memory_gb": 0.05}))
