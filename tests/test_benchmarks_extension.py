"""benchmarks/extension.py without Ray: one extension's record from a run.json, the summary over
seeds (accuracy change, worst case, losses, churn, paired against the default), rendering, presets."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import extension  # noqa: E402


def _gen(index, acc, promoted=None, flip=0.05, fix=0.08, steps=100):
    g = {"index": index, "status": "finished", "rows": 300, "train": {"steps": steps}, "extended": index >= 2,
         "metrics": {"accuracy": acc, "nll": 1.0 - acc}, "continual": {"flip_rate": flip, "fix_rate": fix}}
    if promoted is not None:
        g["promoted"] = promoted
    return g


def test_record_compares_the_final_model_before_and_after():
    m = {"generations": [_gen(0, 0.60), _gen(1, 0.70), _gen(2, 0.65)]}
    r = extension.extension_record(m)
    assert (r["before"], r["after"], r["student"], r["promoted"]) == (0.70, 0.65, 0.65, True)
    assert r["change"] == pytest.approx(-0.05) and r["nll_change"] == pytest.approx(0.05)
    # The gate kept generation 1: the final model did not change, the student was worse.
    m = {"generations": [_gen(0, 0.60), _gen(1, 0.70), _gen(2, 0.65, promoted=False)], "final_generation": 1}
    r = extension.extension_record(m)
    assert (r["after"], r["change"], r["student"], r["promoted"]) == (0.70, 0.0, 0.65, False)
    # The teacher extended is the last promoted generation, not the last one.
    m = {"generations": [_gen(0, 0.60), _gen(1, 0.50, promoted=False), _gen(2, 0.64)]}
    assert extension.extension_record(m)["before"] == 0.60


def _seed(changes, before=0.70):
    return {"block_rows": [300, 300, 300], "holdout_rows": 600,
            "variants": {label: {"before": before, "after": before + c, "change": c, "student": before + c,
                                 "promoted": label != "gate" or c >= 0, "nll_change": -c, "flip_rate": 0.05,
                                 "fix_rate": 0.05 + c, "steps": 38 if label == "one pass" else 100, "rows": 300}
                         for label, c in zip([lb for lb, _ in extension.VARIANTS], changes)}}


def test_summary_counts_losses_and_pairs_with_the_default():
    per_seed = {0: _seed([-0.10, -0.02, 0.00, 0.0]), 1: _seed([0.01, 0.00, 0.01, 0.01]),
                2: _seed([-0.02, -0.01, 0.00, 0.0])}
    s = extension.summarize(per_seed)
    d = s["variants"]["default"]
    assert d["change"]["mean"] == pytest.approx(-0.11 / 3) and d["worst"] == pytest.approx(-0.10)
    assert d["losses"] == 2 and "vs_default" not in d
    nr = s["variants"]["no restart"]
    assert nr["losses"] == 0 and nr["vs_default"]["diffs"] == pytest.approx([0.10, 0.0, 0.02])
    assert nr["churn_vs_default"]["diffs"] == pytest.approx([0.10, 0.0, 0.02])  # fix rate moved with the change
    assert s["variants"]["one pass"]["steps"] == 38
    assert d["churn"]["mean"] == pytest.approx((0.05 + 0.05 - 0.10 + 0.05 + 0.06 + 0.05 + 0.03) / 3)


def test_render_a_fake_result():
    per_seed = {0: _seed([-0.10, -0.02, 0.00, 0.0]), 1: _seed([0.01, 0.00, 0.01, -0.02])}
    result = {"settings": {"rows": 1500, "holdout_rows": 600, "block_rows": 300, "max_length": 32},
              "per_seed": {str(k): v for k, v in per_seed.items()}, "summary": extension.summarize(per_seed)}
    text = extension.render(result)
    assert "| default | — | 100 | -4.50 ± 7.78 |" in text
    assert "| 1 of 2 |" in text  # the default lost more than a point on one seed
    assert "(kept; student -2.00)" in text  # the gate kept the teacher on seed 1


def test_presets(tmp_path):
    a = extension.resolve(extension.parser().parse_args(["--workdir", str(tmp_path)]))
    assert (a.seeds, a.rows, a.eval_fraction, a.max_length) == ([0, 1, 2, 3, 4], 1500, 0.4, 32)
    a = extension.resolve(extension.parser().parse_args(["--smoke"]))
    shutil.rmtree(a.out.parent)
    assert (a.seeds, a.rows) == ([0], 200) and "smoke" in str(a.out)


def test_the_ewc_mode_pairs_the_same_extension_with_and_without_the_penalty(tmp_path, capsys):
    a = extension.resolve(extension.parser().parse_args(["--ewc", "1e6", "--workdir", str(tmp_path)]))
    assert a.seeds == [0, 1, 2] and extension.result_name(a) == "extension_ewc"
    variants = extension.variants_of(a)
    assert variants == (("default", {"method.ewc": 0}), ("ewc", {"method.ewc": 1e6}))
    files = {"seen": (None, "seen.parquet"), "holdout": "holdout.parquet", "label_names": ["a", "b", "c"]}
    assert extension.base_config(a, 0, files)["method"] == {"k": 2, "threshold": 0.9, "ewc": 1e6, "ewc_rows": 64}
    plain = extension.resolve(extension.parser().parse_args(["--workdir", str(tmp_path)]))
    assert "ewc" not in extension.base_config(plain, 0, files)["method"]
    assert extension.seed_settings(plain) == {"rows": 1500, "eval_fraction": 0.4, "max_length": 32}
    assert extension.seed_settings(a) == {"rows": 1500, "eval_fraction": 0.4, "max_length": 32, "ewc": 1e6,
                                          "ewc_rows": 64}
    per_seed = {s: {"block_rows": [300] * 3, "holdout_rows": 600, "variants": {
        "default": {"before": 0.7, "after": 0.7 + c, "change": c, "student": 0.7 + c, "promoted": True,
                    "nll_change": 0.0, "flip_rate": 0.05, "fix_rate": 0.05, "steps": 100, "rows": 300},
        "ewc": {"before": 0.7, "after": 0.71 + c, "change": c + 0.01, "student": 0.71 + c, "promoted": True,
                "nll_change": 0.0, "flip_rate": 0.04, "fix_rate": 0.05, "steps": 100, "rows": 300}}}
        for s, c in ((0, -0.02), (1, 0.0), (2, 0.01))}
    summary = extension.summarize(per_seed, variants)
    assert list(summary["variants"]) == ["default", "ewc"]
    assert summary["variants"]["ewc"]["vs_default"]["diffs"] == pytest.approx([0.01] * 3)
    settings = {"rows": 1500, "holdout_rows": 600, "block_rows": 300, "max_length": 32, "ewc": 1e6, "ewc_rows": 64,
                "variants": dict(variants)}
    text = extension.render({"settings": settings, "summary": summary,
                             "per_seed": {str(k): v for k, v in per_seed.items()}})
    assert "extended with block 2 two ways" in text and "`method.ewc=1e+06` (its generations store their Fisher information, on 64 rows" in text
    assert "| ewc | `method.ewc=1000000.0` |" in text
    with pytest.raises(SystemExit) as exit_:
        extension.main(["--ewc", "0"])
    assert exit_.value.code == 2 and "give the λ to compare against 0" in capsys.readouterr().err
