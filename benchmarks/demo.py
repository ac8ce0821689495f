"""The demo's record: run `make demo`'s command once, time it, and write what it gave to
``benchmarks/results/demo.json``, from which ``docs/generate.py`` renders README's demo table.

    .venv/bin/python benchmarks/demo.py [--note "the machine was shared"]     # or: make demo-record

The figures are the run's own ``run.json`` entries, per generation, and README's table is rendered
from them by the function the console's table comes from; the same seed on the same machine gives
the same bytes, so it is what `make demo` prints there. The command is
exactly `make demo`'s, in the folder it uses (``runs/demo``); an existing folder would be resumed
rather than trained, so the script refuses one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "demo.json"
CONFIG = "jobs/demo.yaml"
COMMAND = ["incr-ray", "train", "--config", CONFIG]


def _holdout_shares(run_dir: Path, label_names: list[str]) -> dict[str, float]:
    """Each label's share of the holdout rows (block -1 of the run's split)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    split = pq.read_table(run_dir / "split", columns=["label", "block"])
    labels = split.filter(pc.equal(split["block"], -1))["label"].to_pylist()
    return {name: labels.count(i) / len(labels) for i, name in enumerate(label_names)}


def _commit() -> str | None:
    """The commit the code came from ("+changes" when the tree differs from it), if this is a checkout."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "--no-optional-locks", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    if not head:
        return None
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")


def record(run_dir: Path, wall_seconds: float, note: str | None, commit: str | None) -> dict[str, Any]:
    """The result file's content, from a finished demo run folder and the command's wall time."""
    manifest = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    if manifest["status"] != "finished":
        raise SystemExit(f"{run_dir} is {manifest['status']}, not finished; nothing recorded")
    return {
        "command": "make demo (" + " ".join(COMMAND) + ")",
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": round(wall_seconds, 1),
        "note": note,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": version("torch"), "commit": commit},
        "config": manifest["config"],
        "label_names": manifest["label_names"],
        "block_sizes": manifest["data"]["block_sizes"],
        "holdout_rows": manifest["data"]["holdout_size"],
        "holdout_shares": _holdout_shares(run_dir, manifest["label_names"]),
        "final_model": os.path.relpath(run_dir / manifest["final_model"], ROOT) if manifest.get("final_model")
        else None,
        "final_generation": manifest.get("final_generation"),
        "generations": manifest["generations"],  # the entries the console's table is printed from
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--note", help="a word on the machine, e.g. that other work shared it")
    a = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from incr_ray.config import load_config

    cfg = load_config(ROOT / CONFIG)
    run_dir = (ROOT / cfg.storage.path / cfg.run.name).resolve()
    if run_dir.exists():
        print(f"{run_dir} exists and would be resumed, not trained; move it away (or `make clean-runs`) "
              "and run this again", file=sys.stderr)
        return 2
    commit = _commit()  # before the run: the code it ran
    bin_dir = Path(sys.executable).parent  # .venv/bin: the incr-ray `make demo` runs
    start = time.monotonic()
    done = subprocess.run([str(bin_dir / COMMAND[0]), *COMMAND[1:]], cwd=ROOT)
    wall = time.monotonic() - start
    if done.returncode != 0:
        print(f"the demo failed (exit {done.returncode}); nothing recorded", file=sys.stderr)
        return done.returncode
    print(f"the demo took {wall:.0f} s ({wall / 60:.1f} min)")
    RESULT.write_text(json.dumps(record(run_dir, wall, a.note, commit), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULT.relative_to(ROOT)} (`make docs` puts it in README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
