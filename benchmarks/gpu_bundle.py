"""The bundle the GPU machine needs to run ``benchmarks/gpu_check.py`` offline, written here (CPU,
PyPI reachable), within the 64 MiB that travels::

    .venv/bin/python benchmarks/gpu_check.py --prepare .gpu_bundle

- ``site.tar.xz``: one site folder with what the GPU machine lacks or has too old — Ray 2.60 (slimmed:
  ELF files stripped; no ``jars/``, dashboard client build, ``rllib/``, ``serve/``, ``llm/``,
  ``*.js.map``, ``*.pyi``), DeepSpeed (pure Python, ops JIT-built there), pydantic and jsonschema,
  and transformers 5.24 (the machine has 5.17; the project pins 5.24) with its tokenizers and hub
  client — each at the version this venv runs, for CPython 3.12 on manylinux x86-64. tar, not zip:
  tar keeps the execute bits of Ray's ``gcs_server`` and ``raylet``; xz packs the raw tree to
  about a sixth.
- ``minilm/``: all-MiniLM-L6-v2's config and tokenizer, no weights (45 MB even in bf16): the GPU
  check draws MiniLM-shaped random weights there.
- ``text.parquet``: Rotten Tomatoes rows (fresh/rotten).
- ``bundle.json``: what is in it, sizes, and the target Python.

On the GPU machine ``gpu_check.py --bundle DIR`` unpacks ``site.tar.xz`` (:func:`unpack_site`) and
runs every section with ``PYTHONPATH=<site>:<repo>``, so the bundle's packages come before the
machine's. The GPU machine: Python 3.12 with torch, numpy, pyarrow, pandas, accelerate, requests,
httpx; no Ray, no DeepSpeed, no pydantic, no jsonschema, no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))

LABELS = ["rotten", "fresh"]  # incr_ray.rotten_tomatoes.LABELS[:2]: ids 0 and 1
MiB = 2**20
BUNDLE_LIMIT = 60 * MiB
GPU_PYTHON = "3.12"  # the GPU machine's
DEEPSPEED_VERSION = "0.19.8"
SITE_ARCHIVE = "site.tar.xz"
WHEEL_CACHE = Path(os.environ.get("INCR_RAY_WHEEL_CACHE", Path.home() / ".cache" / "incr-ray-gpu-wheels"))

# What the bundle brings, with the extras that matter, and the packages of its dependency closure
# the GPU machine already has (big compiled ones and what its torch, pandas, transformers 5.17 and
# huggingface-hub 1.x need). Everything else in the closure travels, at this venv's version.
ROOTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ray", ("data", "train")), ("transformers", ()), ("deepspeed", ()), ("pydantic", ()), ("jsonschema", ()))
ON_GPU_MACHINE = frozenset({
    "torch", "triton", "numpy", "pyarrow", "pandas", "python-dateutil", "pytz", "tzdata", "six", "accelerate",
    "psutil", "packaging", "pyyaml", "tqdm", "filelock", "fsspec", "jinja2", "markupsafe", "networkx", "sympy",
    "mpmath", "setuptools", "requests", "certifi", "charset-normalizer", "idna", "urllib3", "httpx", "httpcore",
    "anyio", "h11", "sniffio", "hf-xet"})
# Ray's parts a headless Ray Data + Ray Train run never loads (measured: the slim tree runs
# ray.init, an actor-pool map_batches, and a 2-worker Ray Train V2 job with a checkpoint).
RAY_DROP = ("ray/jars", "ray/dashboard/client/build", "ray/rllib", "ray/serve", "ray/llm")
DROP_SUFFIXES = (".js.map", ".pyi")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(python_version: str = GPU_PYTHON) -> dict[str, str]:
    """{distribution: version} of :data:`ROOTS` and their dependencies for ``python_version`` on
    Linux, less :data:`ON_GPU_MACHINE`, at the versions installed in this venv."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    env = {"python_version": python_version, "python_full_version": f"{python_version}.0",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found: dict[str, str] = {}
    todo = [(name, extras) for name, extras in ROOTS]
    while todo:
        name, extras = todo.pop()
        key = _norm(name)
        if key in found or key in ON_GPU_MACHINE or key.startswith("nvidia-"):
            continue
        dist = distribution(key)
        found[key] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))
            if wanted:
                todo.append((req.name, tuple(req.extras)))
    return dict(sorted(found.items()))


def _pip(*args: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, **(env or {})})


def fetch_wheels(pins: dict[str, str], python_version: str = GPU_PYTHON, cache: Path = WHEEL_CACHE) -> list[Path]:
    """One wheel per pin for CPython ``python_version`` on manylinux x86-64, kept in ``cache``
    (Ray's is 75 MiB: a rebuild downloads nothing). DeepSpeed ships as an sdist: built here into a
    pure-Python wheel (``DS_BUILD_OPS=0``; its ops JIT-build on the GPU machine)."""
    abi = "cp" + python_version.replace(".", "")
    folder = cache / abi
    folder.mkdir(parents=True, exist_ok=True)

    def cached(name: str, version: str) -> Path | None:
        pattern = re.compile(rf"^{re.sub(r'[-_.]+', '[-_.]', name)}-{re.escape(version)}-", re.I)
        return next((p for p in sorted(folder.glob("*.whl")) if pattern.match(p.name)), None)

    missing = [f"{n}=={v}" for n, v in pins.items() if n != "deepspeed" and cached(n, v) is None]
    if missing:
        _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
             "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
             "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
             "--platform", "manylinux_2_28_x86_64", "--platform", "any", "-d", str(folder), *missing)
    if "deepspeed" in pins and cached("deepspeed", pins["deepspeed"]) is None:
        # No build isolation: the build imports torch, which this venv has and an isolated build would download.
        _pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder), f"deepspeed=={pins['deepspeed']}",
             env={"DS_BUILD_OPS": "0"})
    wheels = []
    for n, v in pins.items():
        w = cached(n, v)
        if w is None:
            raise SystemExit(f"no wheel of {n}=={v} for CPython {python_version} in {folder}; delete it and retry")
        wheels.append(w)
    return wheels


def unpack_wheel(wheel: Path, site: Path) -> None:
    """What ``pip install --no-deps --target`` does for our wheels: the files into ``site`` with
    their modes (``.data/purelib`` and ``platlib`` merged; scripts and headers left out)."""
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                name = "/".join(parts[2:])
            if info.is_dir() or not name:
                continue
            dest = site / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(dest, (mode or 0o644) | 0o444)


def _is_elf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def slim(site: Path) -> dict[str, Any]:
    """Remove :data:`RAY_DROP`, ``*.js.map``, ``*.pyi`` and caches; ``strip --strip-unneeded`` every
    ELF file (Ray's ``_raylet.so``, ``gcs_server`` and ``raylet`` lose a third). Returns bytes before/after."""
    before = tree_bytes(site)
    for rel in RAY_DROP:
        shutil.rmtree(site / rel, ignore_errors=True)
    for p in list(site.rglob("*")):
        if p.is_dir() and p.name == "__pycache__":
            shutil.rmtree(p, ignore_errors=True)
        elif p.is_file() and p.name.endswith(DROP_SUFFIXES):
            p.unlink()
    stripped = 0
    strip = shutil.which("strip")
    for p in site.rglob("*"):
        if strip and p.is_file() and not p.is_symlink() and _is_elf(p):
            mode = p.stat().st_mode
            os.chmod(p, mode | stat.S_IWUSR)
            if subprocess.run([strip, "--strip-unneeded", str(p)], capture_output=True).returncode == 0:
                stripped += 1
            os.chmod(p, mode)
    return {"raw_bytes_before": before, "raw_bytes": tree_bytes(site), "elf_stripped": stripped}


def tree_bytes(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


# -9 (64 MiB dictionary): 28.4 MiB for the 3.12 site, against 35.5 at -6 (whose 24 MiB blocks pack in
# parallel but each alone); about 3 minutes on 2 cores.
XZ_PRESET = 9


def write_archive(site: Path, archive: Path, preset: int = XZ_PRESET) -> None:
    """``site``'s contents as tar.xz at xz ``preset`` (the xz tool with all cores when present, else
    Python's lzma)."""
    xz = shutil.which("xz")
    if xz:
        with open(archive, "wb") as out:
            tar = subprocess.Popen(["tar", "-C", str(site), "-cf", "-", "."], stdout=subprocess.PIPE)
            subprocess.run([xz, f"-{preset}", "-T0", "-c"], stdin=tar.stdout, stdout=out, check=True)
            tar.stdout.close()
            if tar.wait() != 0:
                raise RuntimeError(f"tar of {site} failed")
    else:
        with tarfile.open(archive, "w:xz", preset=preset) as t:
            t.add(str(site), arcname=".")


def unpack_site(archive: str | Path, dest: str | Path | None = None) -> Path:
    """Unpack ``site.tar.xz`` once into ``dest`` (default: a folder in the temp dir named by the
    archive's hash) and return it; a second call finds it done (``.unpacked`` marker)."""
    archive = Path(archive)
    if dest is None:
        h = hashlib.sha256()
        with open(archive, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        dest = Path(os.environ.get("TMPDIR", "/tmp")) / f"incr-ray-gpu-site-{h.hexdigest()[:12]}"
    dest = Path(dest)
    if (dest / ".unpacked").is_file():
        return dest
    tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(archive, "r:xz") as t:
        t.extractall(tmp, filter="tar")  # keeps the execute bits of gcs_server and raylet
    (tmp / ".unpacked").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def write_minilm_tokenizer(dest: str | Path, src: str | None = None) -> dict[str, Any]:
    """all-MiniLM-L6-v2's config and tokenizer files (no weights) into ``dest``."""
    from incr_ray.modeling import minilm_dir

    src_dir, dest = Path(src or minilm_dir()), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(src_dir.iterdir()):
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return {"source": str(src_dir), "files": copied}


def write_minilm_bf16(src: str | Path, dest: str | Path) -> dict[str, Any]:
    """Copy a model folder with its safetensors weights cast to bf16 (integer buffers kept): the
    real MiniLM for a run that has room for it (45 MB; the default bundle carries no weights).

    The config still says float32, so ``from_pretrained`` loads it as float32 exactly like the
    original folder: the copy is a smaller transport, not a different model (bar bf16 rounding).
    """
    import torch
    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    write_minilm_tokenizer(dest, str(src))
    weights = src / "model.safetensors"
    tensors = load_file(str(weights))
    cast = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(cast, str(dest / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(dest / "model.safetensors", 0o644)  # save_file writes 0600; the bundle is copied to another machine
    return {"source": str(src), "fp32_bytes": weights.stat().st_size,
            "bf16_bytes": (dest / "model.safetensors").stat().st_size, "tensors": len(cast)}


def prepare_offline(bundle: str | Path, rows: int = 3000, minilm_src: str | None = None,
                    minilm_weights: bool = False) -> dict[str, Any]:
    """The network-free part of the bundle: ``minilm/`` (tokenizer and config; bf16 weights with
    ``minilm_weights``) and ``text.parquet``."""
    from incr_ray.modeling import minilm_dir
    from incr_ray.rotten_tomatoes import read_reviews

    bundle = Path(bundle)
    bundle.mkdir(parents=True, exist_ok=True)
    src = minilm_src or minilm_dir()
    minilm = (write_minilm_bf16(src, bundle / "minilm") if minilm_weights
              else write_minilm_tokenizer(bundle / "minilm", src))
    df = read_reviews(rows, labels=LABELS)
    df.to_parquet(bundle / "text.parquet", index=False)
    return {"minilm": minilm, "text_rows": len(df), "text_fresh_fraction": float(df["label"].mean())}


def build_site(bundle: Path, python_version: str = GPU_PYTHON, cache: Path = WHEEL_CACHE,
               xz_preset: int = XZ_PRESET) -> dict[str, Any]:
    """``<bundle>/site.tar.xz``: the closure's wheels unpacked into one folder, slimmed, packed."""
    pins = closure(python_version)
    if "deepspeed" in pins and pins["deepspeed"] != DEEPSPEED_VERSION:
        raise SystemExit(f"this venv runs deepspeed {pins['deepspeed']}, the bundle expects {DEEPSPEED_VERSION}")
    wheels = fetch_wheels(pins, python_version, cache)
    site = bundle / "site.tmp"
    shutil.rmtree(site, ignore_errors=True)
    for w in wheels:
        unpack_wheel(w, site)
    slimmed = slim(site)
    started = time.perf_counter()
    write_archive(site, bundle / SITE_ARCHIVE, xz_preset)
    packed_s = time.perf_counter() - started
    ray_raw = tree_bytes(site / "ray")
    shutil.rmtree(site)
    return {"python": python_version, "packages": pins, "wheel_bytes": sum(w.stat().st_size for w in wheels),
            **slimmed, "ray_raw_bytes": ray_raw, "archive_bytes": (bundle / SITE_ARCHIVE).stat().st_size,
            "pack_seconds": round(packed_s, 1), "xz_preset": xz_preset}


def prepare(bundle: str | Path, python_version: str = GPU_PYTHON, cache: Path = WHEEL_CACHE,
            minilm_weights: bool = False, xz_preset: int = XZ_PRESET) -> dict[str, Any]:
    """Write the whole bundle (``minilm/``, ``text.parquet``, ``site.tar.xz``, ``bundle.json``) and
    check its size against :data:`BUNDLE_LIMIT`. ``python_version`` other than 3.12 builds the same
    bundle for another interpreter (the tests run it for this machine's). ``xz_preset``: the tests
    pack at 1 (seconds, not minutes; a bundle under the limit there is under it at -9 too)."""
    bundle = Path(bundle)
    if bundle.exists():
        shutil.rmtree(bundle)
    info = prepare_offline(bundle, minilm_weights=minilm_weights)
    info["site"] = build_site(bundle, python_version, cache, xz_preset)
    size = tree_bytes(bundle) + len(json.dumps(info)) + 64
    info.update(bytes=size, limit_bytes=BUNDLE_LIMIT)
    (bundle / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    site = info["site"]
    print(f"site.tar.xz {site['archive_bytes'] / MiB:.1f} MiB ({site['raw_bytes'] / MiB:.0f} MiB unpacked, "
          f"Ray {site['ray_raw_bytes'] / MiB:.0f} MiB) for CPython {python_version}: "
          + ", ".join(f"{n} {v}" for n, v in site["packages"].items()))
    print(f"bundle {bundle}: {size / MiB:.1f} MiB in {sum(1 for p in bundle.rglob('*') if p.is_file())} files")
    if size > BUNDLE_LIMIT:
        raise SystemExit(f"bundle is {size / MiB:.1f} MiB, over the {BUNDLE_LIMIT / MiB:.0f} MiB limit: "
                         "drop packages from ROOTS or add what the GPU machine has to ON_GPU_MACHINE")
    return info
