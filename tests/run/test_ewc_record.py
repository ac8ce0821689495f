"""What EWC leaves in run.json (``entry.ewc``) and on the console, from a plain metrics dict."""

from __future__ import annotations

from incr_ray.run.manifest import GenerationEntry
from incr_ray.run.record import ewc_without_anchor_line, record_fit

HOLDOUT = {"accuracy": 0.8, "macro_f1": 0.79, "nll": 0.5, "ece": 0.04, "n": 300}
FISHER = {"rows": 256, "estimator": "expected", "weights": 41, "params": 1_234_567, "mean": 1e-6, "max": 0.3,
          "bytes": 9_876_543, "seconds": 2.5}
PENALTY = {"anchor_generation": 0, "anchor_rows": 256, "weights": 41, "params": 1_234_567, "left_out": 0,
           "penalty_first": 0.0, "penalty_last": 0.012, "penalty_mean": 0.008, "share_last": 0.05}


def test_ewc_gets_its_own_field_and_lines():
    entry = GenerationEntry(index=1)
    ewc = {"lambda": 10.0, **PENALTY, "fisher": FISHER}
    said = record_fit(entry, {"holdout": HOLDOUT, "eval_seconds": 1.0, "steps": 4, "ewc": ewc})
    assert entry.ewc == ewc and entry.train == {"steps": 4}
    assert said == [
        "[gen 1] EWC λ=10 against gen 0's Fisher (1,234,567 weights): penalty 0 at the first batch, "
        "0.012 at the last (5.0% of its loss), mean 0.008",
        "[gen 1] Fisher information on 256 rows stored for the next student (1,234,567 weights, 9.4 MiB, 2.5 s)",
    ]


def test_generation_0_has_a_fisher_and_no_penalty_and_ewc_off_says_nothing():
    entry = GenerationEntry(index=0)
    said = record_fit(entry, {"holdout": HOLDOUT, "eval_seconds": 1.0, "ewc": {"lambda": 1.0, "fisher": FISHER}})
    assert said == ["[gen 0] Fisher information on 256 rows stored for the next student (1,234,567 weights, 9.4 MiB, 2.5 s)"]
    off = GenerationEntry(index=1)
    assert record_fit(off, {"holdout": HOLDOUT, "eval_seconds": 1.0}) == [] and off.ewc is None


def test_the_report_has_an_ewc_table_when_it_was_on():
    from incr_ray.run.report_tables import DASH, ewc_table_markdown

    gens = [{"index": 0, "ewc": {"lambda": 10.0, "fisher": FISHER}},
            {"index": 1, "ewc": {"lambda": 10.0, **PENALTY, "fisher": FISHER}}]
    table = ewc_table_markdown(gens).splitlines()
    assert table[2] == f"| 0 | 10 | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | {DASH} | 256 | 9.4 | 2.5 |"
    assert table[3] == "| 1 | 10 | 0 | 1,234,567 | 0 | 0.012 | 0.008 | 5.0% | 256 | 9.4 | 2.5 |"
    assert ewc_table_markdown([{"index": 0}]) is None


def test_ewc_asked_for_against_a_teacher_without_fisher_is_said_not_skipped_silently():
    plain = GenerationEntry(index=1, status="finished")
    line = ewc_without_anchor_line(2, 1e6, plain)
    assert line.startswith("[gen 2] warning: method.ewc=1e+06 but gen 1 stored no Fisher information")
    assert "without the EWC penalty" in line
    anchored = GenerationEntry(index=1, status="finished", fisher="gen_001/fisher.safetensors")
    assert ewc_without_anchor_line(2, 1e6, anchored) is None
    assert ewc_without_anchor_line(2, 0.0, plain) is None and ewc_without_anchor_line(0, 1e6, None) is None
