"""Measured memory per Ray Train worker for each ZeRO preset, next to `incr_ray.plan`'s prediction.

    python benchmarks/zero_memory.py          # ~5 minutes on 2 cores, ~6 GiB of RAM at its peak

Trains a random-weight Llama-style sequence classifier (MiniLM tokenizer's vocabulary) for a few
steps with 2 CPU workers in a ``TorchTrainer``, once per configuration: ZeRO-0, ZeRO-2, ZeRO-3 and
ZeRO-3 with optimizer offload. The DeepSpeed config is the project's own
(:func:`incr_ray.generation.deepspeed_config.build_deepspeed_config`), its ``"auto"`` values filled by
``TrainingArguments`` exactly as the HF ``Trainer`` fills them; the steps are driven through
``deepspeed.initialize`` directly so that memory can be sampled between backward and step.

Per worker process (all host memory: on CPU, "GPU" and "offloaded" states share the same RAM):

- baseline: RSS after torch, transformers and DeepSpeed are imported and the process group is up,
  before the model is built;
- model states: max RSS − baseline over the samples taken once every state exists (after the
  second backward onwards: parameters, gradients and Adam's moments all allocated, activations
  freed); each sample follows ``gc.collect()`` and ``malloc_trim(0)`` so freed heap is returned;
- live tensors: bytes of distinct tensor storages alive at that same sample (every tensor Python
  can see, plus each parameter's ``.grad``): the allocator-independent cross-check;
- peak RSS: ``ru_maxrss`` at the end (includes transient buffers and the baseline).

The prediction is :func:`incr_ray.plan.zero_model_states` for fp32 (4Ψ + 4Ψ + 8Ψ split as the
stage says), GPU and CPU parts added; the issue's target is prediction within 25% of measured.
Results go to ``benchmarks/results/zero_memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (Ray on loopback, nothing fetched from a hub: set before ray is imported)

GiB = 2**30
MiB = 2**20
WORKERS = 2
TOLERANCE = 0.25

# (label, deepspeed section); the planner's Layout is derived from the same fields.
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ZeRO-0", dict(stage=0)),
    ("ZeRO-2", dict(stage=2)),
    ("ZeRO-3", dict(stage=3)),
    ("ZeRO-3 + opt. offload", dict(stage=3, offload_optimizer=True)),
)


# ---------------------------------------------------------------------------------------------
# Per worker


def _rss_bytes() -> int:
    """Resident set size after handing freed heap back to the OS, so it tracks live memory."""
    import ctypes
    import gc

    import psutil

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS then also counts freed-but-kept heap
        pass
    return psutil.Process().memory_info().rss


def _live_tensor_bytes(params) -> int:
    """Bytes of distinct CPU tensor storages alive now (views and aliases counted once)."""
    import gc

    import torch

    storages: dict[int, int] = {}

    def add(t) -> None:
        if t is None or not issubclass(type(t), torch.Tensor) or t.device.type != "cpu":
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        if s.data_ptr():
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())

    for obj in gc.get_objects():
        add(obj)
    for p in params:  # autograd leaves .grad as a C++ tensor Python may never have seen
        add(p.grad)
    return sum(storages.values())


def measure_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on each Ray Train worker: build the model, take a few ZeRO steps, sample memory."""
    import resource
    import traceback

    import ray.train

    rank = ray.train.get_context().get_world_rank()
    out = Path(loop_config["out_dir"]) / f"rank{rank}.json"
    record: dict[str, Any] = {"rank": rank, "pid": os.getpid(),
                              "maxrss_at_start": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    samples: dict[str, int] = {}
    try:
        import deepspeed
        import torch
        from transformers import AutoModelForSequenceClassification, LlamaConfig, TrainingArguments

        from incr_ray.config import DeepSpeedSection
        from incr_ray.generation.deepspeed_config import build_deepspeed_config

        import logging

        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        deepspeed.init_distributed(dist_backend="gloo")
        torch.set_num_threads(1)  # two workers on two shared cores

        ds_config = build_deepspeed_config(DeepSpeedSection(**loop_config["deepspeed"]), on_gpu=False,
                                           precision="fp32")
        steps, batch, seq = loop_config["steps"], loop_config["batch_size"], loop_config["seq_len"]
        # Created before the model, as in incr_ray.generation.student: under ZeRO-3 it makes from_config
        # partition the weights while they are built (zero.Init); it also fills the "auto" values.
        args = TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix=f"zero-mem-r{rank}-"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=1, learning_rate=1e-4, max_steps=steps, report_to=[],
            deepspeed=ds_config, use_cpu=True,
        )
        samples["baseline"] = _rss_bytes()

        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(LlamaConfig(**loop_config["model"]))
        samples["model built"] = _rss_bytes()
        hf_ds = args.hf_deepspeed_config
        hf_ds.trainer_config_finalize(args, model, steps)
        final_config = hf_ds.config
        record["deepspeed_config"] = final_config
        params = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, config=final_config)
        samples["deepspeed.initialize"] = _rss_bytes()
        record["optimizer"] = f"{type(engine.optimizer).__name__} wrapping {type(engine.basic_optimizer).__name__}"
        record["partitioned"] = bool(getattr(next(model.parameters()), "ds_id", None) is not None)

        gen = torch.Generator().manual_seed(rank)
        vocab = loop_config["model"]["vocab_size"]
        for step in range(1, steps + 1):
            ids = torch.randint(1, vocab, (batch, seq), generator=gen)  # no pad id: last token pools
            labels = torch.randint(0, loop_config["model"]["num_labels"], (batch,), generator=gen)
            loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            engine.backward(loss)
            del loss
            samples[f"backward {step}"] = _rss_bytes()
            if step == 2:
                record["live_tensor_bytes_backward_2"] = _live_tensor_bytes(params)
            engine.step()
            samples[f"step {step}"] = _rss_bytes()
        record["live_tensor_bytes_end"] = _live_tensor_bytes(params)
    except BaseException as exc:  # noqa: BLE001 - recorded for the table, then re-raised
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["traceback"] = traceback.format_exc()
        raise
    finally:
        record["samples"] = samples
        record["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.write_text(json.dumps(record, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# Driver


def model_config(vocab_size: int, pad_token_id: int, hidden: int, layers: int, intermediate: int) -> dict:
    return dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                intermediate_size=intermediate, max_position_embeddings=256, num_labels=2,
                pad_token_id=pad_token_id)


def predicted_bytes(params: int, section: dict[str, Any]) -> dict[str, int]:
    """The planner's per-worker model states; on CPU its GPU and CPU parts are the same RAM."""
    from incr_ray.plan import Layout, training_precision, zero_model_states

    layout = Layout(section["stage"], section.get("offload_optimizer", False), section.get("offload_params", False))
    states = zero_model_states(params, WORKERS, layout, training_precision("fp32"))
    return {"gpu_bytes": states.gpu_bytes, "cpu_bytes": states.cpu_bytes,
            "total_bytes": states.gpu_bytes + states.cpu_bytes}


def summarize(ranks: list[dict]) -> dict[str, Any]:
    """Per-rank figures and their max over ranks (the worker that decides whether a run fits)."""
    per_rank = []
    for r in ranks:
        s = r["samples"]
        base = s["baseline"]
        order = list(s)  # insertion order: baseline, model built, ..., backward 1, step 1, backward 2, ...
        settled = [s[k] for k in order[order.index("step 1") + 1:]]  # every state exists from here on
        per_rank.append({
            "rank": r["rank"],
            "baseline_rss": base,
            "states_rss_delta": max(settled) - base,
            "after_first_step_rss_delta": s["step 1"] - base,
            "live_tensor_bytes": r["live_tensor_bytes_backward_2"],
            "peak_rss": r["peak_rss"],
            "peak_rss_delta": r["peak_rss"] - base,
            "maxrss_at_start": r["maxrss_at_start"],
            "samples_rss_delta": {k: v - base for k, v in s.items()},
        })
    worst = {k: max(p[k] for p in per_rank) for k in
             ("baseline_rss", "states_rss_delta", "after_first_step_rss_delta", "live_tensor_bytes",
              "peak_rss", "peak_rss_delta")}
    return {"per_rank": per_rank, "max_over_ranks": worst,
            "optimizer": ranks[0].get("optimizer"), "partitioned_at_load": ranks[0].get("partitioned"),
            "deepspeed_config": ranks[0].get("deepspeed_config")}


def run_case(label: str, section: dict[str, Any], loop: dict[str, Any], storage: str) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir = tempfile.mkdtemp(prefix="zero-mem-", dir=storage)
    trainer = TorchTrainer(
        measure_per_worker,
        train_loop_config={**loop, "deepspeed": {**section, "precision": "fp32"}, "out_dir": out_dir},
        scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=f"zero-mem-{section['stage']}-{int(time.time())}", storage_path=storage),
    )
    started = time.perf_counter()
    fit_error = None
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - one failing configuration must not hide the others
        fit_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    seconds = time.perf_counter() - started
    ranks = [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob("rank*.json"))]
    errors = [r for r in ranks if "error" in r]
    result: dict[str, Any] = {"label": label, "deepspeed": section, "fit_seconds": round(seconds, 1)}
    if errors or fit_error or len(ranks) != WORKERS:
        result["error"] = errors[0]["error"] if errors else (fit_error or f"{len(ranks)} of {WORKERS} ranks reported")
        result["traceback"] = errors[0]["traceback"] if errors else None
        result["partial_samples"] = {r["rank"]: r.get("samples") for r in ranks}
        return result
    result.update(summarize(ranks))
    return result


def table(results: list[dict]) -> list[str]:
    """Fixed-width rows (MiB per worker, max over the 2 ranks)."""
    head = (f"{'config':<22} {'planner':>8} {'measured':>9} {'ratio':>6} {'±25%':>5} {'tensors':>8} "
            f"{'peak Δ':>8} {'peak RSS':>9} {'baseline':>9}")
    rows = [head, "-" * len(head)]
    for r in results:
        pred = r["predicted"]["total_bytes"]
        if "error" in r:
            rows.append(f"{r['label']:<22} {pred / MiB:>8.0f}   did not run: {r['error'][:160]}")
            continue
        m = r["max_over_ranks"]
        rows.append(
            f"{r['label']:<22} {pred / MiB:>8.0f} {m['states_rss_delta'] / MiB:>9.0f} {r['ratio']:>6.2f} "
            f"{'met' if r['within_target'] else 'MISS':>5} {m['live_tensor_bytes'] / MiB:>8.0f} "
            f"{m['peak_rss_delta'] / MiB:>8.0f} {m['peak_rss'] / MiB:>9.0f} {m['baseline_rss'] / MiB:>9.0f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--steps", type=int, default=3, help="at least 2: states are read from step 2 on")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--only", nargs="*", help="a subset of: " + ", ".join(repr(c[0]) for c in CASES))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"), help="folder for the results")
    a = parser.parse_args(argv)
    if a.steps < 2:
        parser.error("--steps must be at least 2: model states are complete only after the first step")
    cases = [c for c in CASES if not a.only or c[0] in a.only]
    if not cases:
        parser.error(f"--only matched none of {[c[0] for c in CASES]}")

    import deepspeed
    import psutil
    import ray
    import torch
    import transformers
    from transformers import AutoTokenizer, LlamaConfig

    from incr_ray.modeling import minilm_dir
    from incr_ray.plan import count_parameters

    tok = AutoTokenizer.from_pretrained(minilm_dir())
    mcfg = model_config(tok.vocab_size, tok.pad_token_id, a.hidden, a.layers, a.intermediate)
    params, largest = count_parameters(LlamaConfig(**mcfg))
    print(f"model: Llama-style classifier, hidden {a.hidden}, {a.layers} layers, intermediate {a.intermediate}, "
          f"vocab {tok.vocab_size} (MiniLM tokenizer), 2 labels: Ψ = {params:,} "
          f"({params * 4 / MiB:.0f} MiB of fp32 weights); {WORKERS} workers, {a.steps} steps of "
          f"batch {a.batch_size} × {a.seq_len} tokens per worker", flush=True)

    loop = {"model": mcfg, "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len}
    storage = tempfile.mkdtemp(prefix="zero-memory-bench-")
    ray.init(address="local", num_cpus=WORKERS, include_dashboard=False, log_to_driver=False)
    results = []
    try:
        for label, section in cases:
            print(f"running {label} ...", flush=True)
            r = run_case(label, section, loop, storage)
            r["predicted"] = predicted_bytes(params, section)
            if "error" not in r:
                measured = r["max_over_ranks"]["states_rss_delta"]
                r["ratio"] = r["predicted"]["total_bytes"] / measured
                r["within_target"] = abs(r["ratio"] - 1) <= TOLERANCE
            print(f"  {label}: {'error: ' + r['error'] if 'error' in r else 'ok'} ({r['fit_seconds']} s)", flush=True)
            results.append(r)
    finally:
        ray.shutdown()
        shutil.rmtree(storage, ignore_errors=True)

    rows = table(results)
    legend = [
        f"MiB per worker (max over {WORKERS} ranks), Ψ = {params:,}, fp32, {WORKERS} Ray Train CPU workers.",
        "planner:  incr_ray.plan.zero_model_states (fp32: 4Ψ params + 4Ψ grads + 8Ψ Adam, split by stage), "
        "GPU + CPU parts",
        "measured: max RSS after the 2nd backward onwards − RSS before the model was built (model states)",
        "ratio:    planner / measured; ±25%: the issue's target |ratio − 1| ≤ 0.25",
        "tensors:  bytes of distinct live tensor storages after the 2nd backward (cross-check of 'measured')",
        "peak Δ:   ru_maxrss − baseline; peak RSS: ru_maxrss of the worker; baseline: RSS before the model",
    ]
    print()
    print("\n".join(rows))
    print()
    print("\n".join(legend))

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/zero_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"cpus": os.cpu_count(), "memory_bytes": psutil.virtual_memory().total,
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                    "ray": ray.__version__},
        "model": {**mcfg, "params": params, "largest_layer_params": largest, "family": "llama"},
        "workers": WORKERS, "steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "tolerance": TOLERANCE, "results": results,
    }
    (out / "zero_memory.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    (out / "zero_memory.md").write_text(_markdown(meta, results, params) + "\n")
    print(f"\nwrote {out / 'zero_memory.json'} and {out / 'zero_memory.md'}")
    return 0


def _markdown(meta: dict, results: list[dict], params: int) -> str:
    m = meta["machine"]
    lines = [
        "# ZeRO model-state memory per worker, measured on CPU",
        "",
        f"`{meta['command'].strip()}` on {m['cpus']} CPUs / {m['memory_bytes'] / GiB:.0f} GiB, {meta['date']}; "
        f"torch {m['torch']}, transformers {m['transformers']}, deepspeed {m['deepspeed']}, ray {m['ray']}.",
        "",
        f"Model: random-weight Llama-style classifier, hidden {meta['model']['hidden_size']}, "
        f"{meta['model']['num_hidden_layers']} layers, vocab {meta['model']['vocab_size']}: "
        f"Ψ = {params:,}. {meta['workers']} Ray Train workers, fp32, {meta['steps']} steps of "
        f"{meta['batch_size']} × {meta['seq_len']} tokens. MiB per worker, max over ranks.",
        "",
        "| config | planner | measured | planner / measured | within 25% | live tensors | peak Δ | peak RSS | baseline |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        pred = r["predicted"]["total_bytes"] / MiB
        if "error" in r:
            lines.append(f"| {r['label']} | {pred:.0f} | did not run: {r['error'][:200]} | | | | | | |")
            continue
        x = r["max_over_ranks"]
        lines.append(
            f"| {r['label']} | {pred:.0f} | {x['states_rss_delta'] / MiB:.0f} | {r['ratio']:.2f} | "
            f"{'met' if r['within_target'] else 'missed'} | {x['live_tensor_bytes'] / MiB:.0f} | "
            f"{x['peak_rss_delta'] / MiB:.0f} | {x['peak_rss'] / MiB:.0f} | {x['baseline_rss'] / MiB:.0f} |")
    lines += [
        "",
        "- planner: `incr_ray.plan.zero_model_states(Ψ, 2, layout, training_precision('fp32'))`, GPU + CPU "
        "bytes (one pool of RAM on CPU).",
        "- measured: max over the samples from the second backward on of RSS − RSS before the model was built; "
        "every sample after `gc.collect()` + `malloc_trim(0)`.",
        "- live tensors: bytes of distinct tensor storages Python can reach (plus each parameter's `.grad`) "
        "after the second backward.",
        "- peak Δ: `ru_maxrss` − baseline, i.e. including transient buffers (gradient buckets, flattening copies).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
