"""The small run every end-to-end test starts from (synthetic data, a tiny model, k=3), and a
stand-in finished run folder for the checks made before Ray starts."""

from __future__ import annotations

import json
from pathlib import Path

from incr_ray.config import config_from_dict


def small_config(tmp_path, tiny_model, name, **sections):
    raw = {
        "run": {"name": name, "seed": 1},
        "storage": {"path": str(tmp_path)},
        "data": {"source": "synthetic", "synthetic_rows": 1500, "synthetic_classes": 3, "eval_fraction": 0.2},
        "model": {"base": tiny_model, "max_length": 32},
        "method": {"k": 3, "threshold": 0.9},
        "student": {"epochs": 2, "min_steps": 0, "learning_rate": 1e-2, "batch_size": 16},
        "deepspeed": {"stage": 2},
        "teacher": {"batch_size": 128},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def fake_run(folder: Path) -> str:
    """A folder with a valid finished ``run.json`` (and nothing else): enough for the checks made before Ray."""
    folder.mkdir(parents=True)
    manifest = {"version": 1, "name": "incr-run", "run_dir": str(folder), "status": "finished", "created": "now",
                "config": {}, "label_names": ["a", "b"],
                "data": {"fingerprint": "f", "block_sizes": [1], "holdout_size": 1}}
    (folder / "run.json").write_text(json.dumps(manifest))
    return str(folder)
