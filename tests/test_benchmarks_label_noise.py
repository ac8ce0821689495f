"""benchmarks/label_noise.py without Ray: the seeded label flips, the suspects' precision and recall
against the flipped rows (and a random flag's), the summary over seeds and its rendering."""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import label_noise  # noqa: E402

NAMES = ["fresh", "rotten", "plot"]


def test_flips_a_seeded_share_to_another_class_and_nests_the_rates():
    labels = [NAMES[i % 3] for i in range(1000)]
    low, low_mask = label_noise.flip_labels(labels, NAMES, 0.1, seed=3)
    high, high_mask = label_noise.flip_labels(labels, NAMES, 0.2, seed=3)
    assert low_mask.sum() == 100 and high_mask.sum() == 200
    assert all(n != c for n, c, f in zip(high, labels, high_mask) if f)  # a flip is always a different class
    assert all(n == c for n, c, f in zip(high, labels, high_mask) if not f)
    assert (high_mask | low_mask).sum() == 200  # 20% holds 10%, flipped to the same classes
    assert all(lo == hi for lo, hi, f in zip(low, high, low_mask) if f)
    assert set(Counter(n for n, f in zip(high, high_mask) if f)) == set(NAMES)  # every wrong class is drawn
    again, again_mask = label_noise.flip_labels(labels, NAMES, 0.2, seed=3)
    assert again == high and (again_mask == high_mask).all()
    assert label_noise.flip_labels(labels, NAMES, 0.2, seed=4)[0] != high
    assert label_noise.flip_labels(labels, NAMES, 0.0, seed=3)[0] == labels
    with pytest.raises(ValueError):
        label_noise.flip_labels(labels, NAMES, 1.5, seed=3)


def test_flag_scores_against_the_flipped_rows_and_a_random_flag():
    block = list(range(100))
    flipped = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 500]  # 500 is another block's row: not counted
    s = label_noise.flag_scores([0, 1, 2, 50, 51, 777], block, flipped)  # 777: not in the block
    assert (s["flagged"], s["hits"], s["block_rows"], s["block_flipped"]) == (5, 3, 100, 10)
    assert s["precision"] == pytest.approx(0.6) and s["recall"] == pytest.approx(0.3)
    assert s["random_precision"] == pytest.approx(0.1) and s["random_recall"] == pytest.approx(0.05)
    none = label_noise.flag_scores([], block, flipped)
    assert none["precision"] is None and none["recall"] == 0.0
    assert label_noise.flag_scores([1], block, [])["recall"] is None


def test_threshold_sweep_flags_rows_under_each_threshold():
    sweep = label_noise.threshold_sweep([0.01, 0.15, 0.4, 0.9], [10, 11, 12, 13], [10, 12], thresholds=(0.1, 0.5))
    assert sweep["0.1"]["flagged"] == 1 and sweep["0.1"]["precision"] == 1.0 and sweep["0.1"]["recall"] == 0.5
    assert sweep["0.5"]["flagged"] == 3 and sweep["0.5"]["precision"] == pytest.approx(2 / 3)


def test_by_label_counts_the_flags_per_noisy_label():
    got = label_noise.by_label([1, 2, 3], [1, 2, 3, 4, 4], ["plot", "plot", "fresh", "fresh", "fresh"], [2, 4])
    assert got == {"fresh": {"block_rows": 2, "block_flipped": 1, "flagged": 1, "hits": 0},
                   "plot": {"block_rows": 2, "block_flipped": 1, "flagged": 2, "hits": 1}}


def _flags(g, flagged, hits, flipped=20, rows=200):
    """Generation g flagged ``flagged`` rows of a ``rows``-row block whose first ``flipped`` rows
    were flipped, ``hits`` of them flipped ones."""
    s = label_noise.flag_scores([*range(hits), *range(flipped, flipped + flagged - hits)], range(rows), range(flipped))
    s["sweep"] = {"0.1": dict(s), "0.3": dict(s)}
    s["by_label"] = {"plot": {"block_rows": 20, "block_flipped": flipped, "flagged": flagged, "hits": hits}}
    return {"generation": g, **s}


def _run(acc, flags=()):
    gens = [{"generation": i, "rows": 200, "steps": 25, "accuracy": acc, "nll": 1 - acc, "ece": 0.05} for i in range(3)]
    return {"final": {"accuracy": acc, "nll": 1 - acc, "ece": 0.05}, "generations": gens, "seconds": 100.0,
            "flags": list(flags)}


def _pair(seed_shift):
    runs = {"keep": _run(0.70 + seed_shift, [_flags(1, 10, 6), _flags(2, 8, 4)]),
            "one_hot": _run(0.71 + seed_shift, [_flags(1, 10, 6), _flags(2, 0, 0)]),
            "drop": _run(0.72 + seed_shift, [_flags(1, 10, 6), _flags(2, 12, 9)]),
            label_noise.FULL: _run(0.69 + seed_shift)}
    return {"train_rows": 600, "holdout_rows": 300, "flipped": 60, "block_rows": [200, 200, 200], "runs": runs}


def _result():
    per_seed = {s: {"0.1": _pair(0.01 * s)} for s in (0, 1, 2)}
    summary = label_noise.summarize(per_seed, [0.1])
    settings = {"seeds": [0, 1, 2], "rates": [0.1], "rows": 900, "eval_fraction": 0.3, "k": 3, "max_length": 32,
                "suspect_below": 0.2, "holdout_rows": 300, "train_rows": 600, "block_rows": 200}
    return {"settings": settings, "summary": summary, "per_seed": per_seed}


def test_summary_pairs_levers_with_keep_and_the_full_fine_tune():
    r = _result()["summary"]["rates"]["0.1"]
    d = r["differences"]
    assert set(d) == {"one_hot − keep", "drop − keep", "keep − full fine-tune", "one_hot − full fine-tune",
                      "drop − full fine-tune"}
    assert d["drop − keep"]["accuracy"]["diffs"] == pytest.approx([0.02] * 3)
    assert d["keep − full fine-tune"]["accuracy"]["mean"] == pytest.approx(0.01)
    keep = r["flags"]["keep"]
    assert [g["generation"] for g in keep] == [1, 2]
    assert keep[0]["precision"]["mean"] == pytest.approx(0.6) and keep[0]["recall"]["mean"] == pytest.approx(0.3)
    assert keep[0]["random_precision"]["mean"] == pytest.approx(0.1)
    assert keep[0]["precision_minus_random"]["mean"] == pytest.approx(0.5)
    empty = r["flags"]["one_hot"][1]  # no seed flagged anything: no precision, recall 0
    assert empty["seeds_with_flags"] == 0 and empty["precision"] is None and empty["recall"]["mean"] == 0.0
    assert {w["threshold"] for w in r["sweep"]} == {0.1, 0.3}
    assert r["by_label"][0] == {"generation": 1, "label": "plot", "block_rows": 60, "block_flipped": 60,
                                "flagged": 30, "hits": 18}


def test_render_names_every_run_and_comparison():
    text = label_noise.render(_result())
    assert "### 10% of the training labels flipped" in text
    for label in ("| drop − keep |", "| keep − full fine-tune |", "| full fine-tune |", "| one_hot | 2 |"):
        assert label in text
    assert "60.0 [60.0, 60.0]" in text and "0 of 3" in text
    drop_row = text.split("| drop − keep | ")[1].split("\n")[0].split(" | ")
    assert drop_row[0] == "+2.0 [+2.0, +2.0]"  # a constant +2 points: no seed noise
    assert "inside the seed noise" in drop_row[2]  # ECE: 0 on every seed


def test_smoke_preset_writes_to_a_temporary_folder():
    a = label_noise.resolve(label_noise.parser().parse_args(["--smoke"]))
    assert a.seeds == [0] and a.rates == [0.2] and a.k == 2 and a.out != label_noise.harness.RESULTS
    shutil.rmtree(Path(a.out).parent)
    d = label_noise.resolve(label_noise.parser().parse_args([]))
    assert d.seeds == [0, 1, 2] and d.rates == [0.1, 0.2] and d.out == label_noise.harness.RESULTS
