"""New classes in an extension (extend --allow-new-labels), without Ray: the label map's refusal and
growth, what run.json records, the student's grown initial model and the model card's labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from incr_ray.config import Config
from incr_ray.data.errors import DataError
from incr_ray.data.labels import extended_label_map
from incr_ray.run.folder import Run, RunPaths
from incr_ray.run.manifest import Manifest
from incr_ray.run.new_classes import initial_model, new_labels_line


def test_unseen_labels_are_refused_without_the_flag_and_the_message_names_it():
    with pytest.raises(DataError) as refused:
        extended_label_map(["calm", "storm"], {"calm", "hail", "Storm"}, False, "new.csv")
    message = str(refused.value)
    assert "\n" not in message
    assert message == ("new.csv has labels never seen in training (label map ['calm', 'storm']): 'Storm', 'hail'; "
                       "relabel or drop those rows, or pass --allow-new-labels to add them as new classes")


def test_the_flag_appends_unseen_labels_sorted_and_old_ids_never_change():
    assert extended_label_map(["storm", "calm"], {"calm", "sleet", "hail"}, True, "x") == ["storm", "calm", "hail", "sleet"]
    assert extended_label_map(["2", "10"], {"3", "11", "2"}, True, "x") == ["2", "10", "3", "11"]  # numeric order
    assert extended_label_map(["storm", "calm"], {"calm"}, False, "x") == ["storm", "calm"]  # nothing new: no flag needed


def _manifest(tmp_path: Path, model: str) -> Manifest:
    return Manifest.model_validate({
        "name": "r", "run_dir": str(tmp_path), "status": "finished", "created": "now", "config": Config().to_dict(),
        "label_names": ["c0", "c1", "c2"], "data": {"fingerprint": "f", "block_sizes": [10, 10], "holdout_size": 5},
        "generations": [{"index": i, "status": "finished", "model": model, "promoted": True} for i in range(2)],
    })


def test_an_extension_appends_its_labels_and_run_json_says_which_generation_added_them(tmp_path):
    m = _manifest(tmp_path, "gen_001/model")
    g = m.begin_extension("new.csv", 0.0, {}, ["c0", "c1", "c2", "hail"])
    assert g == 2 and m.label_names == ["c0", "c1", "c2", "hail"]
    assert m.to_json()["generations"][2]["new_labels"] == ["hail"]
    assert m.label_names_of(1) == m.teacher_labels(2) == ["c0", "c1", "c2"]
    assert m.label_names_of(2) == ["c0", "c1", "c2", "hail"]
    assert new_labels_line(m, 2) == ("generation 2 adds 1 label(s) the run has never seen to its label map "
                                     "(--allow-new-labels): 3 = 'hail'")
    # An interrupted extension finished with the same data: the map is not grown twice.
    assert m.begin_extension("new.csv", 0.0, {}, ["c0", "c1", "c2", "hail"]) == 2
    assert m.label_names == ["c0", "c1", "c2", "hail"] and m.generations[2].new_labels == ["hail"]
    # A copy of the run's first two generations knows their labels only.
    assert m.forked("copy", "/copy", m.config, generations=2).label_names == ["c0", "c1", "c2"]


def test_the_student_starts_from_the_teacher_with_its_head_grown_once(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from incr_ray.modeling import classifier_logits, load_tokenizer

    m = _manifest(tmp_path, tiny_bert)
    said: list[str] = []
    run = Run(cfg=Config(), paths=RunPaths(str(tmp_path)), manifest=m, on_gpu=False, say=said.append)
    assert initial_model(run, 2, tiny_bert) == tiny_bert  # no new labels: the teacher itself
    m.begin_extension("new.csv", 0.0, {}, ["c0", "c1", "c2", "hail"])
    grown = initial_model(run, 2, tiny_bert)
    assert grown == str(tmp_path / "gen_002" / "initial_model")
    assert m.generations[2].initial_model == "gen_002/initial_model"
    assert json.loads((tmp_path / "run.json").read_text())["generations"][2]["initial_model"] == "gen_002/initial_model"
    assert said == ["[gen 2] the teacher's head grown from 3 to 4 classes (new: 'hail'; new rows from run.seed): "
                    "gen_002/initial_model is the student's initial model"]
    model = AutoModelForSequenceClassification.from_pretrained(grown)
    teacher = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    tok = load_tokenizer(tiny_bert)
    new, old = (classifier_logits(x.eval(), tok, ["apple and river"], 16) for x in (model, teacher))
    assert model.config.id2label[3] == "hail" and new.shape == (1, 4) and abs(new[0, :3] - old[0]).max() < 1e-5
    stamp = (Path(grown) / "model.safetensors").stat().st_mtime_ns
    assert initial_model(run, 2, tiny_bert) == grown and len(said) == 1  # a resumed generation reads it back
    assert (Path(grown) / "model.safetensors").stat().st_mtime_ns == stamp


def _extended_with_hail(tmp_path):
    """A finished k=2 manifest of 3 labels whose extension (generation 2, finished) added ``hail``."""
    gen = {"status": "finished", "model": "m", "metrics": {"accuracy": 0.7}, "train": {"rows": 10, "steps": 4}}
    m = _manifest(tmp_path, "m")
    m.generations = [m.generations[0].model_copy(update=gen), m.generations[1].model_copy(update=gen)]
    m.begin_extension("new.csv", 0.0, {}, ["c0", "c1", "c2", "hail"])
    m.generations[2] = m.generations[2].model_copy(update=gen)
    return m


def test_each_generations_model_card_lists_the_labels_its_model_knows(tmp_path):
    from incr_ray.run.model_card import render_model_card

    m = _extended_with_hail(tmp_path)
    assert "3 labels: `c0`, `c1`, `c2`)" in render_model_card(m, 1)
    assert "4 labels: `c0`, `c1`, `c2`, `hail`)" in render_model_card(m, 2)


def test_old_and_new_classes_are_those_before_and_after_the_last_extension_that_added_labels(tmp_path):
    m = _manifest(tmp_path, "m")
    assert m.class_split(1) is None  # no generation has added labels
    m.begin_extension("new.csv", 0.0, {}, ["c0", "c1", "c2", "hail"])
    m.generations[2].status = "finished"
    m.status = "finished"
    assert m.class_split(1) is None and m.class_split(2) == (2, 3)
    m.begin_extension("more.csv", 0.0, {}, ["c0", "c1", "c2", "hail"])  # no new labels: the split stays
    assert m.class_split(3) == (2, 3)
    m.generations[3].status, m.status = "finished", "finished"
    m.begin_extension("sleet.csv", 0.0, {}, ["c0", "c1", "c2", "hail", "sleet"])
    assert m.class_split(4) == (4, 4)  # hail is old by now


# gen 2 on the run's holdout (old classes only) and on its own holdout (old and new rows); its
# teacher, gen 1, on the same rows (3 classes known; its hail rows count as wrong).
COUNTS = {"holdout": {"rows": [4, 3, 3, 0], "correct": [4, 2, 2, 0]},
          "2": {"rows": [2, 2, 0, 4], "correct": [1, 2, 0, 3]}}
BEFORE = {"holdout": {"rows": [4, 3, 3, 0], "correct": [4, 3, 3, 0]},
          "2": {"rows": [2, 2, 0, 0], "correct": [2, 1, 0, 0]}}  # scored on the old-class rows only


def test_the_old_new_record_and_its_console_lines():
    from incr_ray.run.new_classes import old_new_lines, old_new_record

    names = ["c0", "c1", "c2", "hail"]
    record = old_new_record(names, 3, 2, 1, COUNTS, BEFORE)
    assert record["added_by"] == 2 and record["old_classes"] == 3 and record["new_labels"] == ["hail"]
    assert record["before"] == 1
    run_holdout, own = record["holdouts"]["holdout"], record["holdouts"]["2"]
    assert run_holdout["old_accuracy"] == pytest.approx(0.8) and "new_accuracy" not in run_holdout
    assert run_holdout["old_accuracy_before"] == 1.0 and run_holdout["forgetting"] == pytest.approx(0.2)
    assert set(run_holdout["classes"]) == {"c0", "c1", "c2"}  # no hail rows there
    assert own["classes"]["hail"] == {"rows": 4, "correct": 3, "recall": 0.75}
    assert own["old_accuracy"] == 0.75 and own["new_accuracy"] == 0.75 and own["accuracy"] == 0.75
    assert own["old_accuracy_before"] == 0.75 and own["forgetting"] == 0.0
    json.dumps(record, allow_nan=False)  # run.json-ready: no NaN, no numpy
    lines = old_new_lines(2, record, names)
    assert lines[0] == "extension: old classes c0, c1, c2; new since gen 2: hail"
    assert lines[1] == ("extension, on the run's holdout (10 rows of old classes): gen 2 old classes 0.8000 "
                        "(1.0000 by gen 1, forgetting 20.0 points); all 0.8000")
    assert lines[3] == ("extension, on gen 2's data (4 rows of old classes, 4 of new): gen 2 old classes 0.7500 "
                        "(0.7500 by gen 1, forgetting 0.0 points); new classes 0.7500; all 0.7500")
    assert lines[4] == "extension, recall per class on gen 2's data: c0 0.5000, c1 1.0000, hail 0.7500"
    assert old_new_lines(2, None, names) == []
    # Without the teacher's side (or with other rows) there is no forgetting to say.
    alone = old_new_record(names, 3, 2, None, COUNTS, {"2": {"rows": [1, 2, 0, 0], "correct": [1, 2, 0, 0]}})
    assert "before" not in alone and "forgetting" not in alone["holdouts"]["2"]
    assert "(" not in old_new_lines(2, alone, names)[1].split(": gen 2 ")[1]


def test_the_model_card_of_a_generation_with_new_classes_shows_them(tmp_path):
    from incr_ray.run.model_card import render_model_card
    from incr_ray.run.new_classes import old_new_record

    m = _extended_with_hail(tmp_path)
    m.generations[2].old_new = old_new_record(m.label_names, 3, 2, 1, COUNTS, BEFORE)
    card = render_model_card(m, 2)
    assert "## Old and new classes" in card and "Generation 2 added `hail` to the 3 labels known before" in card
    assert "| 2 | gen 2's data | 4 / 4 | 0.7500 | 0.7500 (gen 1) | +0.0 points | 0.7500 | 0.7500 |" in card
    assert "| 2 | run's holdout | 10 / 0 | 0.8000 | 1.0000 (gen 1) | +20.0 points | – | 0.8000 |" in card
    assert "## Old and new classes" not in render_model_card(m, 1)


def test_a_later_extension_keeps_the_split_and_reads_its_teachers_figures_from_run_json(tmp_path):
    """Generation 3 (no new labels) after generation 2 added hail: hail is still new, and the old
    classes' before is generation 2's own record on generation 2's data (no scoring)."""
    from incr_ray.run.new_classes import old_new_figures, old_new_record

    m = _manifest(tmp_path, "m")
    m.begin_extension("new.csv", 0.0, {}, ["c0", "c1", "c2", "hail"])
    m.generations[2].status, m.generations[2].promoted, m.status = "finished", True, "finished"
    m.generations[2].old_new = old_new_record(m.label_names, 3, 2, 1, COUNTS, BEFORE)
    m.begin_extension("more.csv", 0.0, {}, m.label_names)
    run = Run(cfg=Config(), paths=RunPaths(str(tmp_path)), manifest=m, on_gpu=False, say=print)
    later = {"2": {"rows": [2, 2, 0, 4], "correct": [2, 2, 0, 4]}}
    record = old_new_figures(run, 3, m.teacher_of(3), later)
    assert record["added_by"] == 2 and record["before"] == 2 and record["new_labels"] == ["hail"]
    own = record["holdouts"]["2"]
    assert own["old_accuracy_before"] == 0.75 and own["old_accuracy"] == 1.0 and own["forgetting"] == -0.25
    assert own["new_accuracy"] == 1.0
    assert old_new_figures(run, 1, m.teacher_of(1), later) is None  # before any label was added
