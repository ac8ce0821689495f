"""What the benchmark scripts share: the loopback/offline environment, one local Ray, markdown
tables and the result files (``benchmarks/results/<name>.{json,md,png}``).

Import this module before ray: it sets the environment Ray and the Hugging Face libraries read at
import time: Ray on loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), nothing fetched from a hub,
DeepSpeed on its CPU accelerator.
"""

from __future__ import annotations

import json
import shutil
import os
import platform
import statistics
import sys
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


def start_local_ray() -> None:
    """The same local Ray the CLI starts (no dashboard, worker logs kept off the console)."""
    from incr_ray.cli import init_ray

    init_ray(None)


# ---------------------------------------------------------------------------------------------
# Runs through the project's pipeline


def fork_after_generation_0(source_dir: Path, cfg) -> None:
    """Start ``cfg``'s run folder from a finished run's split and generation 0.

    The manifest is the source's with this run's name and config, so the pipeline's own resume
    (and its settings check) takes over from generation 1.
    """
    from incr_ray.storage import write_json_atomic

    dest = Path(cfg.run_dir)
    if (dest / "run.json").exists():
        return  # already forked (a rerun of this benchmark with --resume)
    manifest = json.loads((source_dir / "run.json").read_text())
    gen0 = manifest["generations"][0]
    if gen0.get("status") != "finished":
        raise RuntimeError(f"{source_dir}: generation 0 is not finished")
    dest.mkdir(parents=True)
    shutil.copytree(source_dir / "split", dest / "split")
    shutil.copytree(source_dir / "gen_000", dest / "gen_000")
    manifest.update(name=cfg.run.name, run_dir=str(dest), status="running", config=cfg.to_dict(),
                    generations=[gen0], forked_from=str(source_dir))
    write_json_atomic(str(dest / "run.json"), manifest)


def _say(line: str) -> None:
    print(f"    {time.strftime('%H:%M:%S')} {line}", flush=True)


def run_k_blocks(cfg) -> dict[str, Any]:
    from incr_ray.run.loop import run_generations

    return run_generations(cfg, say=_say)


def run_full_fine_tune(cfg) -> dict[str, Any]:
    """One generation-0 fit (one-hot CE) on every training row of the same split."""
    from ray.data.expressions import col

    from incr_ray.run.folder import open_run
    from incr_ray.run.loop import run_generation

    with open_run(cfg, say=_say) as run:
        training_rows = run.split_dataset().filter(expr=col("block") >= 0)
        run_generation(run, 0, training_rows, None)
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = [float(v) for v in values]
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


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
