"""The GPU check's profiling sections (``benchmarks/gpu_check.py``), without Ray.

- ``teacher_profile``: where a teacher batch's time goes — tokenize, copy to the GPU, forward,
  targets (softmax and the target rule on the host) — on texts whose lengths spread like real
  documents (one to many reviews each), with rows in arrival order and sorted by length, at
  several batch sizes; padding efficiency and the forward MFU (2·N) of each.
- ``offload``: DeepSpeed's CPU Adam (what ``offload_optimizer`` runs): its JIT build time, and its
  step time with 1 OpenMP thread (what a GPU worker given 1 CPU gets) and with every CPU
  (issue 24, item 17). Each thread count in a fresh process: ``OMP_NUM_THREADS`` is read when the
  OpenMP runtime starts, and the op's runtime is not torch's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from gpu_mfu import TEACHER_GOAL, forward_flops_per_token, mfu_figures


def spread_texts(df, n: int, seed: int = 0) -> list[str]:
    """``n`` texts of one to ~24 real reviews joined (log-normal count: most short, a long tail),
    so lengths spread from tens to thousands of characters as documents do."""
    import numpy as np

    rng = np.random.default_rng(seed)
    texts = df["text"].astype(str).tolist()
    counts = np.clip(np.round(rng.lognormal(mean=0.6, sigma=1.0, size=n)), 1, 24).astype(int)
    return [" ".join(texts[int(i)] for i in rng.integers(len(texts), size=c)) for c in counts]


def profile_batches(model, tokenizer, texts: list[str], batch: int, max_length: int, on_gpu: bool,
                    method) -> dict[str, Any]:
    """Per-phase seconds over ``texts`` in batches of ``batch``, after one warm-up batch: tokenize
    (the tokenizer on the host), copy (host to device), forward (to fp32 logits on the device),
    targets (logits to the host, softmax, the target rule)."""
    import numpy as np
    import torch

    from incr_ray.method.targets import soft_targets, softmax

    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    rng = np.random.default_rng(0)
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    phases = dict(tokenize=0.0, copy=0.0, forward=0.0, targets=0.0)
    tokens = padded = rows = 0
    for i, chunk in enumerate([chunks[0], *chunks]):  # the first is the warm-up, not counted
        t0 = time.perf_counter()
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        t1 = time.perf_counter()
        enc = enc.to(device)
        sync()
        t2 = time.perf_counter()
        with torch.no_grad():
            logits = model(**enc).logits.float()
        sync()
        t3 = time.perf_counter()
        probs = softmax(logits.cpu().numpy(), method.temperature)
        labels = rng.integers(probs.shape[1], size=len(chunk))
        soft_targets(probs, labels, threshold=method.threshold, floor=method.floor)
        t4 = time.perf_counter()
        if i == 0:
            continue
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[name] += dt
        tokens += int(enc["attention_mask"].sum())
        padded += int(enc["attention_mask"].numel())
        rows += len(chunk)
    total = sum(phases.values())
    return {"batch": batch, "rows": rows, "seconds": total, "rows_per_s": rows / total,
            "phase_seconds": phases, "phase_share": {k: v / total for k, v in phases.items()},
            "tokens": tokens, "padded_tokens": padded, "padding_efficiency": tokens / padded,
            "forward_tokens_per_s": tokens / phases["forward"], "tokens_per_s": tokens / total}


def check_teacher_profile(ctx, out: dict[str, Any]) -> None:
    """MiniLM-shaped teacher (random weights) on spread-length text: phases, sorted vs not, batch sizes."""
    from transformers import AutoConfig

    from incr_ray.config import config_from_dict
    from incr_ray.modeling import load_for_inference
    from incr_ray.plan import count_parameters

    st = (dict(rows=96, max_length=128, batches=[16, 32]) if ctx.cpu else
          dict(rows=4096, max_length=512, batches=[64, 256, 1024]))
    folder = ctx.minilm_model()
    cfg = config_from_dict({"run": {"name": "gpu-check-profile"},
                            "data": {"source": "rotten_tomatoes", "binary": True, "labels": ["rotten", "fresh"]},
                            "model": {"base": folder, "max_length": st["max_length"]},
                            "teacher": {"cpus_per_actor": 1}})
    model, tokenizer = load_for_inference(folder, cfg, ctx.on_gpu)
    params = count_parameters(AutoConfig.from_pretrained(folder))[0]
    texts = spread_texts(ctx.texts(), st["rows"])
    lengths = sorted(len(t) for t in texts)
    out.update(model=folder, params=params, max_length=st["max_length"], rows=len(texts),
               tokenizers_parallelism=os.environ.get("TOKENIZERS_PARALLELISM"),
               model_dtype=str(next(model.parameters()).dtype),
               text_chars={q: lengths[int(q / 100 * (len(lengths) - 1))] for q in (5, 25, 50, 75, 95, 100)},
               configs=[])
    out.write()
    by_length = sorted(texts, key=len)  # characters: a free proxy for the token count
    peak = ctx.measured_peak()
    for batch in st["batches"]:
        for order, rows in (("arrival order", texts), ("sorted by length", by_length)):
            name = f"b{batch} {order}"
            if ctx.left() < 15:
                out["configs"].append({"name": name, "status": f"skipped: {ctx.left():.0f} s left"})
                continue
            res = profile_batches(model, tokenizer, rows, batch, st["max_length"], ctx.on_gpu, cfg.method)
            res.update(name=name, order=order, status="ok",
                       mfu=mfu_figures(params, res["tokens_per_s"], "forward", peak, ctx.gpu_name(), TEACHER_GOAL),
                       forward_only_mfu=mfu_figures(params, res["forward_tokens_per_s"], "forward", peak, ctx.gpu_name()))
            out["configs"].append(res)
            out.write()
    ok = [r for r in out["configs"] if r.get("status") == "ok"]
    best = max(ok, key=lambda r: r["rows_per_s"])
    out["summary"] = {f"{r['name']}: rows/s, tokenize/copy/forward/targets share, padding efficiency":
                      f"{r['rows_per_s']:.0f}; " + "/".join(f"{v:.2f}" for v in r["phase_share"].values())
                      + f"; {r['padding_efficiency']:.2f}" for r in ok}
    out["summary"]["best"] = best["name"]
    out["summary"]["best: forward MFU (2·N) / vendor peak, whole batch"] = best["mfu"].get("mfu_vendor")
    out["summary"]["best: forward MFU (2·N) / measured peak, forward phase only"] = \
        best["forward_only_mfu"].get("mfu_measured")
    out["flops_per_token_forward"] = forward_flops_per_token(params)


# =============================================================================================
# offload

_ADAM_PROBE = r"""
import json, os, sys, time
import torch
from deepspeed.accelerator import get_accelerator
t = time.perf_counter()
get_accelerator().create_op_builder("CPUAdamBuilder").load()
build = time.perf_counter() - t
from deepspeed.ops.adam import DeepSpeedCPUAdam
n, reps = int(sys.argv[1]), int(sys.argv[2])
p = torch.nn.Parameter(torch.zeros(n))
p.grad = torch.randn(n)
opt = DeepSpeedCPUAdam([p], lr=1e-3)
opt.step()
steps = []
for _ in range(reps):
    t = time.perf_counter()
    opt.step()
    steps.append(time.perf_counter() - t)
print("RESULT " + json.dumps({"load_or_build_s": build, "step_s": min(steps), "steps_s": steps,
                              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}))
"""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_offload(ctx, out: dict[str, Any]) -> None:
    """DeepSpeed CPU Adam: build time, step time at 1 thread and at every CPU."""
    params, reps = (1_000_000, 3) if ctx.cpu else (100_000_000, 3)
    cpus = cpu_count()
    out.update(params=params, cpus=cpus, runs=[])
    for threads in dict.fromkeys((1, cpus)):
        if ctx.left() < 10:
            out["configs"].append({"name": f"{threads} thread(s)", "status": f"skipped: {ctx.left():.0f} s left"})
            continue
        # A build folder of this section's own: the first run pays the JIT build (what a fresh GPU
        # machine pays), and no other process's lock in the shared ~/.cache/torch_extensions can stall it.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCH_EXTENSIONS_DIR": str(ctx.work / "torch_extensions")}
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _ADAM_PROBE, str(params), str(reps)], capture_output=True,
                              text=True, env=env, timeout=max(5.0, ctx.left() - 5))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        run: dict[str, Any] = {"name": f"{threads} thread(s)", "threads": threads,
                               "process_s": time.perf_counter() - started}
        if line is None:
            run.update(status="error", error=(proc.stderr or proc.stdout)[-2000:])
        else:
            run.update(json.loads(line[len("RESULT "):]), status="ok",
                       params_per_s=params / json.loads(line[len("RESULT "):])["step_s"])
        out["configs"].append(run)
        out.write()
    ok = {r["threads"]: r for r in out["configs"] if r.get("status") == "ok"}
    out["summary"] = {"CPU Adam first load (JIT build)": ok[min(ok)]["load_or_build_s"] if ok else None,
                      **{f"step seconds at {t} thread(s), {params / 1e6:.0f}M params": r["step_s"] for t, r in ok.items()}}
    if 1 in ok and cpus in ok and cpus != 1:
        out["summary"][f"speed-up of {cpus} threads over 1"] = ok[1]["step_s"] / ok[cpus]["step_s"]
