"""benchmarks/class_incremental.py without Ray: the summary over seeds (each arm's old/new/overall
accuracy and forgetting, paired against herding), rendering, presets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import class_incremental as ci  # noqa: E402


def _arm(old, new, base_old=0.80, seconds=100.0):
    return {"old": old, "new": new, "overall": (2 * old + new) / 3, "forgetting": old - base_old,
            "seconds": seconds, "memory_rows": 100}


def _seed(shift=0.0):
    return {"base": {"old": 0.80, "new": 0.0, "overall": 0.53, "seconds": 60.0},
            "arms": {"herding": _arm(0.76 + shift, 0.90), "uniform": _arm(0.74 + shift, 0.90),
                     "herding + ewc 1e6": _arm(0.77 + shift, 0.88),
                     "herding + ewc 1e5": _arm(0.75 + shift, 0.89), "fine-tune": _arm(0.10 + shift, 0.99, seconds=50.0),
                     "retrain": _arm(0.79 + shift, 0.93, seconds=150.0)}}


def test_summary_pairs_every_arm_against_herding_by_seed():
    per_seed = {0: _seed(0.0), 1: _seed(0.02), 2: _seed(-0.01)}
    s = ci.summarize(per_seed)
    assert s["seeds"] == [0, 1, 2]
    assert s["base_old"]["mean"] == pytest.approx(0.80)
    assert "vs_baseline" not in s["arms"]["herding"]
    fine = s["arms"]["fine-tune"]
    # The same shift on every arm of a seed cancels in the paired difference: no spread at all.
    assert fine["vs_baseline"]["old"]["mean"] == pytest.approx(-0.66)
    assert fine["vs_baseline"]["old"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert fine["forgetting"]["mean"] == pytest.approx(0.10 + 0.01 / 3 - 0.80)
    assert s["arms"]["retrain"]["vs_baseline"]["seconds"]["mean"] == pytest.approx(50.0)


def test_render_names_each_arm_its_settings_and_the_paired_differences():
    per_seed = {0: _seed(0.0), 1: _seed(0.02), 2: _seed(-0.01)}
    result = {"settings": {"old": 600, "new": 200, "test_old": 300, "test_new": 150, "per_class": 50,
                           "max_length": 32},
              "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": ci.summarize(per_seed)}
    text = ci.render(result)
    for label, _ in ci.ARMS:
        assert f"| {label} |" in text
    assert "`replay.selection=\"herding\"`" in text and "a new run on everything" in text
    assert "| fine-tune | −66.0 [−66.0, −66.0] |" in text  # old classes, points
    assert "0.760 / 0.900 / 0.807" in text  # seed 0's herding row


def test_presets_fill_what_the_command_line_left(tmp_path):
    a = ci.resolve(ci.parser().parse_args(["--smoke", "--workdir", str(tmp_path)]))
    assert (a.seeds, a.old, a.new, a.per_class) == ([0], 80, 40, 8)
    a = ci.resolve(ci.parser().parse_args(["--old", "500", "--workdir", str(tmp_path)]))
    assert (a.seeds, a.old, a.test_new) == ([0, 1, 2], 500, 150)


def test_resume_runs_only_the_arms_a_finished_seed_lacks(tmp_path, monkeypatch):
    import harness

    a = ci.resolve(ci.parser().parse_args(["--workdir", str(tmp_path), "--resume"]))
    settings = {k: getattr(a, k) for k in ("old", "new", "test_old", "test_new", "per_class", "max_length")}
    record = _seed()
    del record["arms"]["herding + ewc 1e5"]
    (tmp_path / "s0" / "base").mkdir(parents=True)
    (tmp_path / "s0" / "base" / "run.json").write_text("{}")
    harness.save_seed(tmp_path / "s0", settings, record)
    ran = []
    monkeypatch.setattr(ci, "write_files", lambda a, seed, folder: {})
    monkeypatch.setattr(ci, "base_settings", lambda *args: {})
    monkeypatch.setattr("incr_ray.config.config_from_dict", lambda raw: None)
    monkeypatch.setattr(ci, "run_arm", lambda a, seed, label, *rest: ran.append(label) or _arm(0.70, 0.90))
    out = ci.seed_result(a, 0)
    assert ran == ["herding + ewc 1e5"]  # the base run and the four finished arms are not run again
    assert out["arms"]["herding + ewc 1e5"]["old"] == 0.70 and out["arms"]["herding"]["old"] == 0.76
    assert harness.read_seed(tmp_path / "s0", settings) == out  # saved with the new arm
    assert ci.missing_arms(out) == []
