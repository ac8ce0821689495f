"""What the benchmark scripts share: the loopback/offline environment, one local Ray, markdown
tables and the result files (``benchmarks/results/<name>.{json,md,png}``).

Import this module before ray: it sets the environment Ray and the Hugging Face libraries read at
import time: Ray on loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), nothing fetched from a hub,
DeepSpeed on its CPU accelerator.

The statistics the scripts share (the mean and 95% confidence interval of paired per-seed
differences, the verdict a goal gets from one) live in the package, ``incr_ray.method.paired``,
where ``incr-ray compare`` reads them too; they are imported here under their names. What a run is — its result (``incr_ray.run.report.final_entry``), a copy
of its first generations (``incr_ray.run.folder.fork_run``) — the scripts take from the package.
"""

from __future__ import annotations

import json
import os
import shutil
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from a clone without `pip install -e`
    sys.path.insert(0, str(ROOT))

from incr_ray.method.paired import (T_975, Z_975, fmt_difference, mean_ci, mean_std,  # noqa: E402,F401
                                    paired_difference, seeds_to_resolve, t_975, verdict)


def start_local_ray() -> None:
    """The same local Ray the CLI starts (no dashboard, worker logs kept off the console)."""
    from incr_ray.cli import init_ray

    init_ray(None)


# ---------------------------------------------------------------------------------------------
# Runs through the project's pipeline


def write_block_files(seed: int, rows: int, eval_fraction: float, k: int, data_dir: Path) -> dict[str, Any]:
    """Split ``rows`` Rotten Tomatoes rows with the project's own split (holdout + k blocks) and write
    them as the files a user would receive: ``holdout.parquet``, ``block_<i>.parquet`` and
    ``seen_<i>.parquet`` (blocks 0 … i together), labels as names."""
    from incr_ray.config import config_from_dict
    from incr_ray.data import split_data

    cfg = config_from_dict({
        "run": {"name": "split", "seed": seed},
        "data": {"source": "rotten_tomatoes", "max_rows": rows, "eval_fraction": eval_fraction},
        "method": {"k": k},
    })
    split = split_data(cfg)
    table = split.dataset.to_pandas()
    table["label"] = [split.label_names[int(i)] for i in table["label"]]
    table = table.sort_values("row_id", kind="stable")  # a file's order does not depend on Ray's
    data_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"label_names": list(split.label_names), "holdout": str(data_dir / "holdout.parquet"),
                             "blocks": [], "seen": []}
    table[table["block"] < 0][["text", "label"]].to_parquet(files["holdout"], index=False)
    for i in range(k):
        block, seen = data_dir / f"block_{i}.parquet", data_dir / f"seen_{i}.parquet"
        table[table["block"] == i][["text", "label"]].to_parquet(block, index=False)
        table[(table["block"] >= 0) & (table["block"] <= i)][["text", "label"]].to_parquet(seen, index=False)
        files["blocks"].append(str(block))
        files["seen"].append(str(seen))
    files["block_rows"] = [int((table["block"] == i).sum()) for i in range(k)]
    files["holdout_rows"] = int((table["block"] < 0).sum())
    return files


def apply_preset(a, defaults: dict[str, Any], smoke: dict[str, Any], name: str):
    """Fill the sizes the command line left unset from ``defaults`` (and ``smoke`` with
    ``--smoke``, which also writes into a temporary folder); the run folders go to
    ``--workdir`` or ``runs/benchmarks/<name>``, the results to ``--out`` or :data:`RESULTS`."""
    preset = dict(defaults, **(smoke if a.smoke else {}))
    for key, value in preset.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.smoke:
        tmp = Path(tempfile.mkdtemp(prefix=f"incr-ray-{name}-smoke-"))
        a.workdir = a.workdir or tmp / "runs"
        a.out = a.out or tmp / "results"
    a.workdir = (a.workdir or ROOT / "runs" / "benchmarks" / name).resolve()
    a.out = a.out or RESULTS
    return a


def seed_once(folder: Path, settings: dict[str, Any], resume: bool, run, clear: bool = True) -> dict[str, Any]:
    """A seed's record: read back from ``<folder>/seed.json`` with ``resume`` when that seed
    finished with the same ``settings``; else ``run()`` makes it (in a cleared ``folder`` unless
    ``clear`` is False) and it is saved there."""
    saved = read_seed(folder, settings) if resume else None
    if saved is not None:
        print(f"[{folder.name}] finished earlier, read from {folder / 'seed.json'}", flush=True)
        return saved
    if clear and folder.exists():
        shutil.rmtree(folder)
    return save_seed(folder, settings, run())


def read_seed(folder: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The record ``<folder>/seed.json`` holds when that seed finished with the same ``settings``."""
    done = folder / "seed.json"
    if not done.exists():
        return None
    saved = json.loads(done.read_text())
    return saved["result"] if saved.get("settings") == settings else None


def save_seed(folder: Path, settings: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    (folder / "seed.json").write_text(json.dumps({"settings": settings, "result": result}, indent=1))
    return result


def run_seeds(a, seed_result) -> dict[int, dict[str, Any]]:
    """``seed_result(a, seed)`` for each of ``a.seeds`` on one local Ray, in a ``--workdir``
    cleared first unless ``--resume``."""
    if a.workdir.exists() and not a.resume:
        shutil.rmtree(a.workdir)
    start_local_ray()
    return {seed: seed_result(a, seed) for seed in a.seeds}


def _say(line: str) -> None:
    print(f"    {time.strftime('%H:%M:%S')} {line}", flush=True)


def run_k_blocks(cfg) -> dict[str, Any]:
    from incr_ray.run.loop import run_generations

    return run_generations(cfg, say=_say)


def run_full_fine_tune(cfg, finish: bool = False) -> dict[str, Any]:
    """One generation-0 fit (one-hot CE) on every training row of the same split.

    ``finish``: close the run as ``incr-ray train`` closes one (status finished, final model,
    report), with the training rows recorded as one block, so that ``incr-ray extend`` (or
    :func:`incr_ray.run.loop.extend_run`) can continue it. The config's ``method.k`` only decides
    how the split is dealt, which this fit ignores.
    """
    from ray.data.expressions import col

    from incr_ray.run.folder import finish_run, open_run
    from incr_ray.run.loop import run_generation

    with open_run(cfg, say=_say) as run:
        training_rows = run.split_dataset().filter(expr=col("block") >= 0)
        entry = run_generation(run, 0, training_rows, None)
        if finish and run.manifest.status != "finished":
            run.manifest.data.block_sizes = [int(entry.rows)]
            finish_run(run)  # what run_generations does after its last generation
        return run.manifest.to_json()


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, data: dict[str, Any], markdown: str, png: bytes | None, out: Path = RESULTS) -> None:
    """``<out>/<name>.json`` (+ ``.md`` and ``.png``), each written whole then renamed into place."""
    out.mkdir(parents=True, exist_ok=True)
    files: list[tuple[str, bytes]] = [
        (f"{name}.json", (json.dumps(data, indent=2) + "\n").encode()),
        (f"{name}.md", (markdown.rstrip() + "\n").encode()),
    ]
    if png is not None:
        files.append((f"{name}.png", png))
    for filename, payload in files:
        tmp = out / (filename + ".tmp")
        tmp.write_bytes(payload)
        os.replace(tmp, out / filename)
        print(f"wrote {out / filename}")


def figure_png(fig) -> bytes:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
