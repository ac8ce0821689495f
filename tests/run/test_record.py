"""What a student's fit leaves in run.json (``record_fit``), from a plain metrics dict, without Ray."""

from __future__ import annotations

from incr_ray.run.manifest import GenerationEntry
from incr_ray.run.record import continual_record, record_fit

HOLDOUT = {"accuracy": 0.8, "macro_f1": 0.79, "nll": 0.5, "ece": 0.04, "n": 300}


def _fit(**more):
    """What fit_student returns, with the workers' evaluations ``more`` adds."""
    return {"holdout": HOLDOUT, "eval_seconds": 3.0, "train_loss": 0.4, "steps": 19, "zero_stage": 0, **more}


def test_a_plain_fit_keeps_its_holdout_metrics_and_the_rest_as_train():
    entry, fit = GenerationEntry(index=0), _fit()
    assert record_fit(entry, fit) == []
    assert entry.metrics == HOLDOUT and entry.eval_seconds == 3.0
    assert entry.train == {"train_loss": 0.4, "steps": 19, "zero_stage": 0}
    assert entry.validation is entry.calibration is entry.drift is entry.continual is None
    assert fit == _fit()  # the caller's dict is left as it was


def test_every_evaluation_gets_its_field_and_its_line():
    entry = GenerationEntry(index=2)
    calibration = {"temperature": 1.4, "ece_before": 0.1, "ece_after": 0.04, "nll_before": 0.6, "nll_after": 0.5}
    fit = _fit(validation={"rows": 120, "accuracy": 0.78, "nll": 0.55}, calibration=calibration,
               retention={"accuracy": 0.75, "nll": 0.6, "rows": 200}, drift={"1": {"accuracy": 0.7, "nll": 0.8}},
               class_counts={"holdout": {"rows": [3, 2], "correct": [2, 2]}})
    said = record_fit(entry, fit, teacher=GenerationEntry(index=1),
                      teacher_validation={"teacher_accuracy": 0.74, "teacher_nll": 0.6},
                      flips={"flip_rate": 0.05, "fix_rate": 0.125})
    assert entry.validation == {"rows": 120, "accuracy": 0.78, "nll": 0.55, "teacher_accuracy": 0.74, "teacher_nll": 0.6}
    assert entry.calibration == calibration and entry.drift == {"1": {"accuracy": 0.7, "nll": 0.8}}
    assert entry.continual == {"flip_rate": 0.05, "fix_rate": 0.125, "retention_accuracy": 0.75, "retention_nll": 0.6,
                               "retention_rows": 200}
    assert entry.train == {"train_loss": 0.4, "steps": 19, "zero_stage": 0}
    assert said == [
        "[gen 2] on the extensions' own holdouts: gen 1's data acc 0.7000",
        "[gen 2] temperature 1.400 fitted on 120 validation rows: holdout ECE 0.1000 → 0.0400, NLL 0.6000 → 0.5000",
        "[gen 2] against its teacher (gen 1) 5.0% of holdout rows went right → wrong, 12.5% wrong → right; "
        "accuracy 0.7500 on 200 rows of earlier blocks",
    ]


def test_a_slice_too_small_to_calibrate_says_so():
    entry = GenerationEntry(index=1)
    said = record_fit(entry, _fit(validation={"rows": 12, "accuracy": 0.7, "nll": 0.6},
                                  calibration={"temperature": 1.0}))
    assert said[0].startswith("[gen 1] no temperature fitted: the validation slice has 12 rows, fewer than")
    assert said[0].endswith("raise method.validation_fraction")


def test_continual_figures_need_a_teacher_for_the_flip_rates():
    assert continual_record(0, None, {"flip_rate": 0.1, "fix_rate": 0.2}, None) == (None, [])
    out, said = continual_record(3, GenerationEntry(index=2), {"flip_rate": 0.1, "fix_rate": 0.2}, None)
    assert out == {"flip_rate": 0.1, "fix_rate": 0.2}
    assert said == ["[gen 3] against its teacher (gen 2) 10.0% of holdout rows went right → wrong, 20.0% wrong → right"]
