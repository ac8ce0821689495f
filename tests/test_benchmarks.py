"""The benchmark scripts' own arithmetic: how per-seed results become mean ± std, curves and the
met/missed verdicts, and the fitted growth line. The scripts themselves are run by hand (docs/benchmarks.md); here nothing starts Ray."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality  # noqa: E402
import throughput  # noqa: E402


def _gen(acc, nll, ece, seconds=10.0, g=0):
    return {"generation": g, "rows": 100, "seconds": seconds, "accuracy": acc, "macro_f1": acc - 0.1,
            "nll": nll, "ece": ece}


def _seed(inc_acc, full_acc, inc_ece=0.05, full_ece=0.08, hard_ece=0.10):
    curve = [_gen(0.6, 0.9, 0.1, g=g) for g in range(3)] + [_gen(inc_acc, 0.7, inc_ece, g=3)]
    hard = curve[:3] + [_gen(0.70, 0.8, hard_ece, g=3)]
    return {
        "incremental": {"final": curve[-1], "generations": curve, "seconds": 40.0},
        "incremental + floor": {"final": curve[-1], "generations": curve, "seconds": 40.0},
        "sequential hard-label": {"final": hard[-1], "generations": hard, "seconds": 40.0},
        "full fine-tune": {"final": _gen(full_acc, 0.75, full_ece), "generations": [_gen(full_acc, 0.75, full_ece)],
                           "seconds": 20.0},
        "block 0 only": {"final": curve[0], "generations": [curve[0]], "seconds": 10.0},
    }


def test_summary_is_mean_and_sample_std_over_seeds():
    summary = quality.summarize({0: _seed(0.70, 0.72), 1: _seed(0.74, 0.72), 2: _seed(0.72, 0.72)})
    acc = summary["methods"]["incremental"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.72)
    assert acc["std"] == pytest.approx(0.02)  # sample std of 0.70, 0.74, 0.72
    assert len(summary["curves"]["incremental"]) == 4
    assert summary["curves"]["incremental"][3]["accuracy"]["mean"] == pytest.approx(0.72)


def test_verdicts_mark_each_goal_met_or_missed():
    met = {v["goal"]: v["met"] for v in quality.verdicts(quality.summarize({0: _seed(0.715, 0.72), 1: _seed(0.715, 0.72)}))}
    assert met["final accuracy within 1 point of full fine-tuning (or better)"] is True  # 0.5 points behind
    assert all(met.values())

    behind = quality.summarize({0: _seed(0.70, 0.72, inc_ece=0.09)})
    met = {v["goal"]: v["met"] for v in quality.verdicts(behind)}
    assert met["final accuracy within 1 point of full fine-tuning (or better)"] is False  # 2 points behind
    assert met["lower ECE than full fine-tuning"] is False  # 0.09 vs 0.08
    assert met["lower ECE than sequential hard-label"] is True  # 0.09 vs 0.10


def test_growth_line_recovers_fixed_cost_and_slope():
    fixed, per_row = throughput.fit_line([250, 500, 1000], [100 + 0.04 * n for n in (250, 500, 1000)])
    assert fixed == pytest.approx(100)
    assert per_row == pytest.approx(0.04)


def test_matmul_peak_is_a_positive_finite_rate():
    flops = throughput.matmul_peak_flops(size=256, seconds=0.2)
    assert math.isfinite(flops) and flops > 1e6


@pytest.mark.parametrize("script", ["quality.py", "throughput.py", "zero_memory.py"])
def test_scripts_describe_their_command(script):
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
