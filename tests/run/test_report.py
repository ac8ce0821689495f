"""report.md, report.json and generations.png from fake manifests: optional fields rendered when
present, and never a failure when absent (run folders written by older versions)."""

from __future__ import annotations

import json

import pytest

from incr_ray.run.report import final_entry, plot_png, render_report, table_markdown


def _gen(i, acc, **extra):
    return {"index": i, "status": "finished", "rows": 100, "block_rows": 100, "model": f"gen_{i:03d}/model",
            "metrics": {"accuracy": acc, "macro_f1": acc - 0.01, "nll": 0.5, "ece": 0.05, "n": 200},
            "train": {"samples_per_second": 7.5}, "seconds": 120.0, **extra}


def _teacher(acc):
    return {"accuracy": acc, "nll": 0.45, "kept": 0.6, "pushed": 0.35, "floored": 0.05,
            "target_entropy": 0.321, "rows": 100.0}


def _manifest(gens, **top):
    return {
        "name": "fake", "run_dir": "/tmp/fake", "status": "finished", "label_names": ["neg", "pos"],
        "data": {"holdout_size": 200},
        "config": {"method": {"k": len(gens), "threshold": 0.9, "floor": None, "temperature": 1.0, "alpha": None},
                   "student": {"init": "previous"}, "model": {"base": "minilm"},
                   "deepspeed": {"stage": 1}, "cluster": {"workers": 1}},
        "generations": gens, **top,
    }


def test_an_old_manifest_without_the_new_fields_still_reports():
    m = _manifest([_gen(0, 0.70), _gen(1, 0.72), _gen(2, 0.75)])
    md, js = render_report(m)
    assert "| 2 | soft targets | 100 | 0.7500 |" in md
    assert "What the teacher" not in md and "flip rate" not in md and "Calibration" not in md
    assert "not promoted" not in md and "extension" not in md
    assert "Final model: `gen_002/model` (generation 2), holdout accuracy 0.7500." in md
    report = json.loads(js)
    assert report["final"]["generation"] == 2
    assert set(report["generations"][1]) == {"index", "rows", "metrics", "train", "seconds", "model"}
    assert plot_png(m).startswith(b"\x89PNG")


def test_teacher_table_per_generation_from_one():
    m = _manifest([_gen(0, 0.70), _gen(1, 0.72, teacher_on_block=_teacher(0.68)),
                   _gen(2, 0.75)])  # generation 2 scored by an older version: dashes, no failure
    md, js = render_report(m)
    section = md.split("## What the teacher and the target rule did")[1]
    assert "| 1 | 100 | 0.6800 | 0.4500 | 60.0% | 35.0% | 5.0% | 0.321 |" in section
    assert "| 2 | 100 | – | – | – | – | – | – |" in section
    assert "| 0 |" not in section.split("![")[0]
    report = json.loads(js)
    assert report["generations"][1]["teacher_on_block"]["accuracy"] == 0.68
    assert "teacher_on_block" not in report["generations"][2]
    assert plot_png(m).startswith(b"\x89PNG")


def test_an_ensemble_teacher_names_its_members():
    """teacher.ensemble: the teacher table names the generations each teacher averaged, the
    header says the setting, and report.json keeps the members."""
    m = _manifest([_gen(0, 0.70), _gen(1, 0.72, teacher_on_block=_teacher(0.68), ensemble=[0]),
                   _gen(2, 0.75, teacher_on_block=_teacher(0.71), ensemble=[0, 1])])
    m["config"]["teacher"] = {"ensemble": 2}
    md, js = render_report(m)
    assert "The teacher of each generation is the mean softmax of the last 2 promoted generations" in md
    section = md.split("## What the teacher and the target rule did")[1]
    assert "| gen | teacher: mean of gens | block rows |" in section
    assert "| 1 | 0 | 100 | 0.6800 |" in section and "| 2 | 0, 1 | 100 | 0.7100 |" in section
    assert "padded with zeros for classes it never saw" in section
    assert json.loads(js)["generations"][2]["ensemble"] == [0, 1]
    plain, _ = render_report(_manifest([_gen(0, 0.70), _gen(1, 0.72, teacher_on_block=_teacher(0.68))]))
    assert "mean of gens" not in plain and "mean softmax" not in plain


def test_the_console_names_an_ensemble_teacher():
    from incr_ray.run.report import ensemble_said

    assert ensemble_said([0, 1], 2) == "teacher = mean softmax of generation(s) 0, 1 (teacher.ensemble 2)"
    assert ensemble_said([0], 3) == "teacher = mean softmax of generation(s) 0 (teacher.ensemble 3; 1 promoted so far)"


def test_gate_continual_and_calibration_fields():
    cal = {"temperature": 1.7, "ece_before": 0.09, "nll_before": 0.52, "ece_after": 0.03, "nll_after": 0.48}
    # As the loop records it: a dict of floats (retention_rows too), fix rate and retention NLL with it.
    cont = {"flip_rate": 0.04, "fix_rate": 0.06, "retention_accuracy": 0.81, "retention_nll": 0.4,
            "retention_rows": 300.0}
    m = _manifest(
        [_gen(0, 0.70, calibration=cal),
         _gen(1, 0.74, promoted=True, continual=cont, teacher_on_block=_teacher(0.7)),
         _gen(2, 0.73, promoted=False, continual=cont, teacher_on_block=_teacher(0.72))],
        final_generation=1,
    )
    md, js = render_report(m)
    assert "| 2 | soft targets, not promoted |" in md
    assert "| 1 | soft targets |" in md  # promoted: no mark
    assert "flip rate | fix rate | retention acc | retention rows" in md
    assert "| 4.0% | 6.0% | 0.8100 | 300 |" in md
    assert "| 0 | one-hot | 100 | 0.7000 | 0.6900 | 0.5000 | 0.0500 | – | – | – | – |" in md
    assert "| 0 | 1.700 | 0.0900 | 0.0300 | 0.5200 | 0.4800 |" in md
    assert "Final model: `gen_001/model` (generation 1), holdout accuracy 0.7400; generation(s) 2 not promoted." in md
    report = json.loads(js)
    assert report["final"] == {"generation": 1, "metrics": m["generations"][1]["metrics"], "model": "gen_001/model"}
    assert report["generations"][2]["promoted"] is False
    assert report["generations"][1]["continual"] == cont
    assert report["generations"][0]["calibration"] == cal
    assert plot_png(m).startswith(b"\x89PNG")


@pytest.mark.parametrize("after, worse", [(0.78, False), (0.70, True)])
def test_extension_line_and_warning(after, worse):
    m = _manifest([_gen(0, 0.70), _gen(1, 0.75, teacher_on_block=_teacher(0.7)),
                   _gen(2, after, extended=True, source="new.csv", teacher_on_block=_teacher(0.71))])
    md, js = render_report(m)
    assert "| 2 | extend |" in md
    delta = 100 * (after - 0.75)
    assert (f"Generation 2 extension: holdout accuracy 0.7500 (generation 1) → {after:.4f} "
            f"({delta:+.1f} points).") in md
    assert ("**Warning:**" in md) is worse
    ext = json.loads(js)["generations"][2]["extension"]
    assert ext["worse"] is worse and ext["delta_points"] == pytest.approx(delta)
    assert ext["previous_generation"] == 1


def test_an_extension_with_its_own_settings_says_them():
    m = _manifest([_gen(0, 0.70), _gen(1, 0.75),
                   _gen(2, 0.76, extended=True, settings={"student.schedule": "run"})])
    md, js = render_report(m)
    assert "Generation 2 extension (trained with `student.schedule=run`): holdout accuracy 0.7500" in md
    assert json.loads(js)["generations"][2]["settings"] == {"student.schedule": "run"}


def test_the_memory_and_balanced_fine_tuning_get_their_table():
    memory = {"path": "gen_001/memory.parquet", "selection": "herding", "per_class": 6, "rows": 18, "classes": 3,
              "candidates": 90, "per_label": {"a": 6, "b": 6, "c": 6}, "mean_distance": 0.0125}
    balanced = {"rows": 18, "per_class": 6, "steps": 4, "epochs": 2.0, "learning_rate": 0.001, "loss_mean": 1.1}
    m = _manifest([_gen(0, 0.70), _gen(1, 0.72, memory=memory, train={"balanced": balanced})])
    md, js = render_report(m)
    assert "## Memory and balanced fine-tuning" in md
    assert "| 1 | herding | 18 | 3 | 6 | 90 | 0.0125 | 18 | 4 | 0.001 |" in md
    assert json.loads(js)["generations"][1]["memory"] == memory
    assert "Memory and balanced" not in render_report(_manifest([_gen(0, 0.70), _gen(1, 0.72)]))[0]


def test_final_generation_absent_or_unknown_is_the_last_finished():
    gens = [_gen(0, 0.7), _gen(1, 0.72), {"index": 2, "status": "running"}]
    assert final_entry(_manifest(gens))["index"] == 1
    assert final_entry(_manifest(gens, final_generation=0))["index"] == 0
    assert final_entry(_manifest(gens, final_generation=2))["index"] == 1  # not finished
    assert final_entry(_manifest([])) is None
    md, js = render_report(_manifest([]))
    assert "Final model" not in md and json.loads(js)["final"] is None


def test_table_markdown_tolerates_missing_metrics():
    # `incr-ray train` prints this table too; a generation without train figures shows dashes.
    table = table_markdown([{"index": 0, "status": "finished", "rows": 5, "metrics": {"accuracy": 0.5}}])
    assert "| 0 | one-hot | 5 | 0.5000 | – | – | – | – | – |" in table


def test_only_the_continual_figures_present_get_columns():
    m = _manifest([_gen(0, 0.7), _gen(1, 0.72, continual={"retention_accuracy": 0.8, "retention_rows": 50.0})])
    md, _ = render_report(m)
    assert "retention acc | retention rows |" in md and "flip rate" not in md
    assert "| 0.8000 | 50 |" in md


def test_drift_matrix_and_backward_transfer():
    from incr_ray.run.report import render_report
    from incr_ray.run.report_tables import drift_matrix

    gens = [
        {"index": 0, "status": "finished", "metrics": {"accuracy": 0.70}},
        {"index": 1, "status": "finished", "metrics": {"accuracy": 0.80}},
        {"index": 2, "status": "finished", "metrics": {"accuracy": 0.78}, "extended": True,
         "own_holdout": "gen_002/own_holdout", "drift": {"2": {"accuracy": 0.60}}},
        {"index": 3, "status": "finished", "metrics": {"accuracy": 0.74}, "extended": True,
         "own_holdout": "gen_003/own_holdout", "drift": {"2": {"accuracy": 0.55}, "3": {"accuracy": 0.90}}},
    ]
    d = drift_matrix(gens)
    assert d["tasks"] == ["holdout", "2", "3"]
    assert [r["generation"] for r in d["rows"]] == [1, 2, 3]
    assert d["rows"][0]["2"] is None and d["rows"][2]["3"] == 0.90
    # The run's holdout: 0.74 now vs 0.80 after generation 1; gen 2's data: 0.55 vs 0.60.
    assert d["backward_transfer"] == pytest.approx(((0.74 - 0.80) + (0.55 - 0.60)) / 2)
    assert drift_matrix(gens[:2]) is None
    manifest = {"name": "r", "label_names": ["a", "b"], "data": {"holdout_size": 10}, "generations": gens,
                "config": {"method": {"k": 2, "threshold": 0.9, "floor": None, "temperature": 1.0, "alpha": 0.0},
                           "student": {"init": "previous"}, "model": {"base": "m"}, "deepspeed": {"stage": 0},
                           "cluster": {"workers": 1}}}
    md, js = render_report(manifest)
    assert "## Drift: accuracy on each data set's own holdout" in md
    assert "| 3 | 0.7400 | 0.5500 | 0.9000 |" in md and "Backward transfer" in md and "-5.5 points" in md
    assert '"backward_transfer"' in js


def test_old_and_new_classes_get_their_section():
    from incr_ray.run.new_classes import old_new_record
    from incr_ray.run.report import render_report
    from incr_ray.run.report_tables import old_new_markdown

    counts = {"holdout": {"rows": [4, 3, 3, 0], "correct": [4, 2, 2, 0]},
              "2": {"rows": [2, 2, 0, 4], "correct": [1, 2, 0, 3]}}
    before = {"holdout": {"rows": [4, 3, 3, 0], "correct": [4, 3, 3, 0]}}
    names = ["c0", "c1", "c2", "hail"]
    gens = [_gen(i, 0.8) for i in range(3)]
    gens[2].update(extended=True, new_labels=["hail"], old_new=old_new_record(names, 3, 2, 1, counts, before))
    md = old_new_markdown(gens, names)
    assert "| 2 | run's holdout | 10 / 0 | 0.8000 | 1.0000 (gen 1) | +20.0 points | – | 0.8000 |" in md
    assert "| 2 | gen 2's data | 4 / 4 | 0.7500 | – | – | 0.7500 | 0.7500 |" in md  # no teacher figures there
    assert "| gen | data set | `c0` | `c1` | `c2` | `hail` |" in md
    assert "| 2 | gen 2's data | 0.5000 | 1.0000 | – | 0.7500 |" in md
    assert old_new_markdown(gens[:2], names) is None
    md, report = render_report(_manifest(gens, label_names=names))
    assert "## Old and new classes" in md and "the forgetting: before − after, positive when" in md
    assert json.loads(report)["generations"][2]["old_new"]["holdouts"]["2"]["new_accuracy"] == 0.75
