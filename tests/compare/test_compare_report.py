"""incr-ray compare's report from its trials' results, without Ray: per-seed differences against the
config's own run, their intervals, failed trials with their errors, an unpaired holdout, the files."""

from __future__ import annotations

import json

import pytest

from incr_ray.compare.plan import plan_compare
from incr_ray.compare.report import plot_png, render_markdown, summarize
from incr_ray.method.paired import paired_difference

RAW = {"run": {"name": "cmp", "seed": 0}, "storage": {"path": "/runs"}, "method": {"k": 2}}


def _result(acc, nll=0.7, seconds=100.0, holdout=200):
    return {"status": "finished", "metrics": {"accuracy": acc, "macro_f1": acc - 0.1, "nll": nll, "ece": 0.05},
            "cost_seconds": seconds, "holdout_size": holdout, "run_dir": "/runs/cmp/x"}


def _plan():
    return plan_compare(RAW, [], 3, "full", ["method.threshold=0.8,1.5"])


def test_differences_are_paired_by_seed_against_the_configs_own_run():
    plan = _plan()
    config = {0: 0.70, 1: 0.72, 2: 0.75}
    full = {0: 0.73, 1: 0.74, 2: 0.79}
    results = {f"config-s{s}": _result(a, seconds=100 + s) for s, a in config.items()}
    results |= {f"full-s{s}": _result(a, nll=0.6, seconds=50) for s, a in full.items()}
    results |= {"method.threshold=0.8-s0": _result(0.69), "method.threshold=0.8-s2": _result(0.76)}
    results |= {"method.threshold=0.8-s1": {"status": "failed", "error": "ModelError: out of memory"}}
    s = summarize(plan, results)
    acc = s["differences"]["full"]["accuracy"]
    want = paired_difference([full[i] for i in range(3)], [config[i] for i in range(3)])
    assert acc["mean"] == pytest.approx(want["mean"]) and acc["lo"] == pytest.approx(want["lo"])
    assert acc["diffs"] == pytest.approx([0.03, 0.02, 0.04])
    assert s["differences"]["full"]["nll"]["mean"] == pytest.approx(-0.1)
    assert s["differences"]["full"]["cost_seconds"]["diffs"] == pytest.approx([-50, -51, -52])
    # A variant with a failed seed is paired over the seeds both finished.
    thr = s["differences"]["method.threshold=0.8"]["accuracy"]
    assert thr["n"] == 2 and thr["diffs"] == pytest.approx([-0.01, 0.01])
    assert thr["noise"] is True and thr["seeds_to_resolve"] == 0  # mean 0: no number of seeds resolves it
    # The refused variant: its trials are failures with the config's one line; it has no numbers.
    refused = [t for t in s["trials"] if t["variant"] == "method.threshold=1.5"]
    assert len(refused) == 3 and all(t["status"] == "failed" and "method.threshold" in t["error"] for t in refused)
    assert s["differences"]["method.threshold=1.5"]["accuracy"] is None
    assert s["means"]["config"]["accuracy"]["mean"] == pytest.approx(0.7233333)
    assert s["unpaired"] == []
    json.dumps(s)  # compare.json


def test_the_markdown_says_what_is_inside_the_seed_noise_and_what_failed():
    plan = _plan()
    results = {f"config-s{s}": _result(0.70 + 0.01 * s) for s in range(3)}
    results |= {f"full-s{s}": _result(a) for s, a in enumerate([0.69, 0.74, 0.73])}
    results |= {"method.threshold=0.8-s1": {"status": "failed", "error": "ModelError: out of memory"}}
    text = render_markdown(summarize(plan, results))
    full_row = [line for line in text.splitlines() if line.startswith("| full |")][1]  # the differences
    assert "inside the seed noise" in full_row and "seeds would resolve it" in full_row
    assert "| method.threshold=0.8 | 1 | ModelError: out of memory |" in text
    assert "| method.threshold=1.5 | 0 | config method.threshold" in text
    assert "method.threshold=0.8 | 0 | did not run" in text  # no result at all
    assert "6 of 12 trials finished" in text


def test_a_variant_that_changes_the_holdout_is_flagged_unpaired():
    plan = plan_compare(RAW, [], 2, None, ["data.eval_fraction=0.3"])
    results = {"config-s0": _result(0.7), "config-s1": _result(0.7),
               "data.eval_fraction=0.3-s0": _result(0.7, holdout=300), "data.eval_fraction=0.3-s1": _result(0.7)}
    s = summarize(plan, results)
    assert s["unpaired"] == ["data.eval_fraction=0.3 seed 0: holdout of 300 rows against 200"]
    assert "Not paired" in render_markdown(s)


def test_the_plot_is_a_png_and_none_without_variants():
    plan = _plan()
    results = {f"{v}-s{s}": _result(0.7 + 0.01 * s + (0.02 if v == "full" else 0)) for v in ("config", "full")
               for s in range(3)}
    assert plot_png(summarize(plan, results))[:8] == b"\x89PNG\r\n\x1a\n"
    alone = plan_compare(RAW, [], 2, None, [])
    assert plot_png(summarize(alone, {})) is None
