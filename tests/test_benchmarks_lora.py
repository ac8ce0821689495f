"""benchmarks/lora.py's own arithmetic: medians over rounds and ratios against full fine-tuning."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import lora  # noqa: E402

MiB = 2**20


def _run(r, trainable, loaded, peak, speed):
    return {"r": r, "trainable_params": trainable, "total_params": 1000, "loaded_rss": loaded * MiB,
            "peak_rss": peak * MiB, "rows_per_second": speed}


def test_summary_takes_medians_and_ratios_against_full_fine_tuning():
    runs = {
        "full fine-tuning": [_run(0, 1000, 400, 1000, 10.0), _run(0, 1000, 400, 1200, 12.0), _run(0, 1000, 400, 1100, 8.0)],
        "LoRA r=8": [_run(8, 10, 400, 600, 20.0), _run(8, 10, 400, 700, 30.0), _run(8, 10, 400, 650, 25.0)],
    }
    full, adapted = lora.summarize(runs)
    assert full["variant"] == "full fine-tuning" and full["rounds"] == 3
    assert (full["peak_rss"], full["training_rss"], full["rows_per_second"]) == (1100 * MiB, 700 * MiB, 10.0)
    assert full["peak_ratio"] == full["speed_ratio"] == full["training_rss_ratio"] == 1.0
    assert adapted["trainable_share"] == pytest.approx(0.01)
    assert adapted["peak_ratio"] == pytest.approx(650 / 1100)
    assert adapted["training_rss_ratio"] == pytest.approx(250 / 700)
    assert adapted["speed_ratio"] == pytest.approx(2.5)
    text = lora.render([full, adapted], {"threads": 2, "batch": 16, "max_length": 48, "steps": 30, "skip": 5})
    line = next(x for x in text.splitlines() if x.startswith("| LoRA r=8"))
    assert line.split(" | ")[1:] == ["10", "1.00%", "650", "0.59", "250", "0.36", "25.0", "2.50 |"]
