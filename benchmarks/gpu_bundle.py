"""The bundle the GPU machine needs to run ``benchmarks/gpu_check.py`` offline, written here (CPU,
PyPI reachable): MiniLM with its weights in bf16 (``minilm/``), Rotten Tomatoes text
(``text.parquet``), and the wheels the GPU machine lacks (pydantic, DeepSpeed and their
dependencies, ``wheels/``), within the size the machine accepts::

    .venv/bin/python benchmarks/gpu_check.py --prepare .gpu_bundle

The GPU machine: Python 3.12 with torch, transformers, accelerate, peft, pyarrow and pandas; no Ray,
no DeepSpeed, no pydantic, no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))

LABELS = ["rotten", "fresh"]  # incr_ray.rotten_tomatoes.LABELS[:2]: ids 0 and 1
BUNDLE_LIMIT = 60 * 2**20
MiB = 2**20

# The wheels the GPU machine lacks. pydantic-core must be the exact version pydantic pins, so both
# are pinned to what this venv runs; the rest are DeepSpeed's Requires-Dist that torch,
# transformers and accelerate do not already bring (numpy, packaging, psutil, tqdm, pyyaml).
WHEELS_BINARY = ("annotated-types", "typing-inspection", "typing-extensions", "hjson", "ninja", "py-cpuinfo",
                 "msgpack", "einops")
DEEPSPEED_VERSION = "0.19.8"
PRESENT_ON_GPU_MACHINE = {"torch", "numpy", "packaging", "psutil", "tqdm", "pyyaml", "transformers",
                          "accelerate", "safetensors", "tokenizers", "huggingface-hub", "pyarrow", "pandas"}


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
    from incr_ray.rotten_tomatoes import read_reviews

    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    minilm = write_minilm_bf16(minilm_src or minilm_dir(), bundle / "minilm")
    df = read_reviews(rows, labels=LABELS)
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
