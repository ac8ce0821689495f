"""The small run every end-to-end test starts from: synthetic data, a tiny model, k=3."""

from __future__ import annotations

from incr_ray.config import config_from_dict


def small_config(tmp_path, tiny_model, name, **sections):
    raw = {
        "run": {"name": name, "seed": 1},
        "storage": {"path": str(tmp_path)},
        "data": {"source": "synthetic", "synthetic_rows": 1500, "synthetic_classes": 3, "eval_fraction": 0.2},
        "model": {"base": tiny_model, "max_length": 32},
        "method": {"k": 3, "threshold": 0.9},
        "student": {"epochs": 2, "learning_rate": 1e-2, "batch_size": 16},
        "deepspeed": {"stage": 2},
        "teacher": {"batch_size": 128},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)
