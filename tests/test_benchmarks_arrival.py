"""benchmarks/arrival.py without Ray: one arrival's record from a run.json, cumulative costs, the
paired per-arrival differences and cost ratios, the claims, and rendering a fake result."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import arrival  # noqa: E402


def _entry(index, acc, seconds=50.0, steps=25, rows=200, scoring=5.0, evaluation=2.0, **extra):
    return {"index": index, "status": "finished", "rows": rows, "seconds": seconds, "eval_seconds": evaluation,
            "scoring_seconds": scoring if index else None, "train": {"steps": steps},
            "metrics": {"accuracy": acc, "macro_f1": acc - 0.1, "nll": 1.0 - acc, "ece": 0.05}, **extra}


def test_step_record_takes_the_ready_model_and_the_cost_just_paid():
    manifest = {"generations": [_entry(0, 0.70), _entry(1, 0.68, seconds=60.0, promoted=False)],
                "final_generation": 0}
    r = arrival.step_record(manifest, 1, call_seconds=75.0, batch=8)
    assert r["generation"] == 0 and r["trained_generation"] == 1  # the gate kept generation 0
    assert r["accuracy"] == 0.70  # the ready model's metrics
    assert r["samples"] == 200 and r["seconds"] == pytest.approx(58.0)  # the new fit's cost, evaluation left out
    assert arrival.step_record(manifest, 1, 75.0, 8, drop_scoring=True)["seconds"] == pytest.approx(53.0)
    # Without final_generation the last generation is the model.
    manifest.pop("final_generation")
    assert arrival.step_record(manifest, 1, 75.0, 8)["accuracy"] == 0.68


def test_cumulate_adds_costs_arrival_by_arrival():
    steps = [{"samples": 200, "seconds": 40.0, "call_seconds": 50.0},
             {"samples": 200, "seconds": 45.0, "call_seconds": 60.0}]
    out = arrival.cumulate(steps)
    assert [s["cum_samples"] for s in out] == [200, 400]
    assert [s["cum_seconds"] for s in out] == [40.0, 85.0]
    assert out[1]["cum_call_seconds"] == 110.0


def _step(i, acc, samples, seconds, nll=None):
    return {"arrival": i, "generation": i, "trained_generation": i, "accuracy": acc, "macro_f1": acc - 0.1,
            "nll": 1.0 - acc if nll is None else nll, "ece": 0.05, "rows": samples, "samples": samples,
            "seconds": seconds, "scoring_seconds": None, "call_seconds": seconds + 10}


def _seed(a_accs, b_accs, c_accs, block=200, fit=40.0):
    """k = 3 arrivals; (a), (c) one block per arrival, (b) everything seen so far."""
    a = arrival.cumulate([_step(i, acc, block, fit + (5 if i else 0)) for i, acc in enumerate(a_accs)])
    b = arrival.cumulate([_step(i, acc, block * (i + 1), fit * (i + 1)) for i, acc in enumerate(b_accs)])
    c = arrival.cumulate([_step(i, acc, block, fit) for i, acc in enumerate(c_accs)])
    return {"block_rows": [block] * 3, "holdout_rows": 200,
            "steps": {"incremental": a, "retrain": b, "fine-tune": c, "full fine-tune": [b[-1]]}}


def _per_seed():
    return {0: _seed([0.60, 0.66, 0.70], [0.60, 0.67, 0.71], [0.60, 0.64, 0.66]),
            1: _seed([0.62, 0.67, 0.72], [0.62, 0.69, 0.72], [0.62, 0.66, 0.67]),
            2: _seed([0.61, 0.65, 0.71], [0.61, 0.66, 0.72], [0.61, 0.64, 0.68]),
            3: _seed([0.59, 0.66, 0.70], [0.59, 0.67, 0.715], [0.59, 0.63, 0.66])}


def test_summary_pairs_methods_at_every_arrival():
    summary = arrival.summarize(_per_seed())
    assert summary["arrivals"] == 3 and summary["seeds"] == [0, 1, 2, 3]
    assert [r["arrival"] for r in summary["methods"]["full fine-tune"]] == [2]
    ab = summary["differences"]["(a) − (b)"]
    assert ab[0]["accuracy"]["diffs"] == pytest.approx([0, 0, 0, 0])  # arrival 0: the same fit
    assert ab[2]["accuracy"]["diffs"] == pytest.approx([-0.01, 0.0, -0.01, -0.015])
    ac = summary["differences"]["(a) − (c)"][2]["accuracy"]
    assert ac["mean"] == pytest.approx(0.04) and ac["noise"] is False
    # Costs: (a) 40 + 45 + 45 s against (b) 40 + 80 + 120 s; 600 rows against 1,200.
    last = summary["cost_ratio"][2]
    assert last["seconds"]["mean"] == pytest.approx(130 / 240)
    assert last["samples"]["mean"] == pytest.approx(0.5)
    assert summary["methods"]["retrain"][2]["cum_samples"]["mean"] == pytest.approx(1200)


def test_claims_at_the_last_arrival():
    c = {x["claim"]: x for x in arrival.claims(arrival.summarize(_per_seed()))}
    assert c["(a) within 1 point of (b)'s accuracy"]["status"] == "inside the seed noise"  # −0.875 points, CI to −1.6
    assert c["(a) at ≤ half of (b)'s cumulative training seconds"]["status"] == "missed"  # 0.54 on every seed
    assert c["(a) at ≤ half of (b)'s cumulative rows trained"]["status"] == "met"  # exactly 0.5
    assert c["(a) beats (c) on accuracy"]["status"] == "met"
    assert c["(a) beats (c) on NLL"]["status"] == "met"
    assert all(x["arrival"] == 2 for x in c.values())


def test_render_and_plot_a_fake_result():
    summary = arrival.summarize(_per_seed())
    result = {"settings": {"seeds": [0, 1, 2, 3], "rows": 1100, "k": 3, "max_length": 32, "epochs": 1.0,
                           "lr": 2e-4, "batch_size": 8, "holdout_rows": 220, "block_rows": 220},
              "summary": summary, "claims": arrival.claims(summary)}
    text = arrival.render(result)
    assert "| 2 | (d) full fine-tune at the end |" in text
    assert "| 0 | +0.00 [+0.00, +0.00], inside the seed noise |" in text
    assert "- MET: (a) beats (c) on accuracy ((a) − (c) = +4.00 [" in text
    assert "- MISSED: (a) at ≤ half of (b)'s cumulative training seconds ((a) / (b) = 0.54" in text
    assert arrival.plot(result)[:4] == b"\x89PNG"


def test_presets(tmp_path):
    a = arrival.resolve(arrival.parser().parse_args(["--workdir", str(tmp_path)]))
    assert (a.seeds, a.rows, a.k, a.max_length) == ([0, 1, 2], 4000, 4, 32)
    a = arrival.resolve(arrival.parser().parse_args(["--smoke"]))
    shutil.rmtree(a.out.parent)  # the temporary folder --smoke made
    assert (a.seeds, a.rows, a.k, a.max_length) == ([0, 1], 160, 2, 16) and "smoke" in str(a.out)
    with pytest.raises(SystemExit):
        arrival.resolve(arrival.parser().parse_args(["--k", "1", "--workdir", str(tmp_path)]))


def test_resume_reads_finished_seeds_and_reruns_the_rest(tmp_path, monkeypatch):
    ran = []

    def fake_run_seed(a, seed):
        ran.append(seed)
        (a.workdir / f"s{seed}").mkdir(parents=True, exist_ok=True)
        return {"block_rows": [seed], "holdout_rows": 1, "steps": {}}

    monkeypatch.setattr(arrival, "run_seed", fake_run_seed)
    a = arrival.resolve(arrival.parser().parse_args(["--workdir", str(tmp_path), "--resume"]))
    assert arrival.seed_result(a, 0) == {"block_rows": [0], "holdout_rows": 1, "steps": {}}
    (tmp_path / "s1").mkdir()
    (tmp_path / "s1" / "half-done").write_text("")  # a seed stopped half-way: cleared, run again
    arrival.seed_result(a, 1)
    assert ran == [0, 1] and not (tmp_path / "s1" / "half-done").exists()
    assert arrival.seed_result(a, 0)["block_rows"] == [0] and ran == [0, 1]  # read back, not run
    a.lr = 1e-3  # other settings: the saved seed does not count
    arrival.seed_result(a, 0)
    assert ran == [0, 1, 0]
    a.resume, a.lr = False, 2e-4
    arrival.seed_result(a, 1)
    assert ran == [0, 1, 0, 1]


def test_script_describes_its_command():
    import subprocess

    out = subprocess.run([sys.executable, str(BENCHMARKS / "arrival.py"), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "--smoke" in out.stdout
