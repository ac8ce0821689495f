"""The generation gate (method.keep_best) and what `extend` says, without Ray."""

from __future__ import annotations

from types import SimpleNamespace

from incr_ray.config import config_from_dict
from incr_ray.run.loop import _gate, _say_extension
from incr_ray.run.manifest import GenerationEntry


def _run(**method):
    said: list[str] = []
    return SimpleNamespace(cfg=config_from_dict({"method": method}), say=said.append), said


def _student(accuracy, nll, teacher_accuracy, teacher_nll):
    return GenerationEntry(index=3, validation={"rows": 40, "accuracy": accuracy, "nll": nll,
                                                "teacher_accuracy": teacher_accuracy, "teacher_nll": teacher_nll})


def test_a_student_worse_than_its_teacher_on_the_slice_is_not_promoted():
    run, said = _run(validation_fraction=0.1, keep_best=True)
    teacher = GenerationEntry(index=1)
    assert _gate(run, 3, _student(0.80, 0.50, 0.75, 0.60), teacher) is True
    assert _gate(run, 3, _student(0.75, 0.55, 0.75, 0.60), teacher) is True  # a tie: NLL decides
    assert said == []
    assert _gate(run, 3, _student(0.75, 0.65, 0.75, 0.60), teacher) is False
    assert _gate(run, 3, _student(0.70, 0.40, 0.75, 0.60), teacher) is False
    assert len(said) == 2 and "generation 1 stays the teacher and the final model" in said[0]


def test_without_the_gate_or_a_teacher_every_student_is_promoted():
    worse = _student(0.5, 0.9, 0.8, 0.4)
    assert _gate(_run(validation_fraction=0.1)[0], 3, worse, GenerationEntry(index=2)) is True
    assert _gate(_run(validation_fraction=0.1, keep_best=True)[0], 0, worse, None) is True


def test_extend_says_what_the_extension_did_and_warns_when_it_got_worse():
    before = GenerationEntry(index=1, metrics={"accuracy": 0.773})
    said: list[str] = []
    _say_extension(said.append, before, GenerationEntry(index=2, metrics={"accuracy": 0.672}, promoted=True))
    assert said[0] == "extension: holdout accuracy 0.7730 (gen 1) → 0.6720 (gen 2), -10.1 points"
    assert said[1].startswith("warning: generation 2 is 10.1 points less accurate on the holdout")
    said.clear()
    _say_extension(said.append, before, GenerationEntry(index=2, metrics={"accuracy": 0.672}, promoted=False))
    assert "the final model stays generation 1" in said[1]
    said.clear()
    _say_extension(said.append, before, GenerationEntry(index=2, metrics={"accuracy": 0.78}, promoted=True))
    assert said == ["extension: holdout accuracy 0.7730 (gen 1) → 0.7800 (gen 2), +0.7 points"]
