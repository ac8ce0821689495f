"""The ensemble teacher in a real run: k=3 with ``teacher.ensemble: 2``, so generation 2 is the first
taught by two generations (0 and 1) and generation 1 by generation 0 alone.

:func:`check_ensemble_targets` holds the assertions on a finished run folder and recomputes the
members' softmaxes with plain transformers (no incr-ray code on that side), so it can ride on any
scenario run whose config sets ``teacher.ensemble`` and has a generation with two members.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from small_run import small_config

pytestmark = pytest.mark.e2e


def member_softmax(model_dir: Path, texts: list[str], max_length: int, temperature: float, num_classes: int):
    """A saved generation's softmax at ``temperature`` on ``texts``, zero-padded to ``num_classes``,
    straight from transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        probs = torch.softmax(model(**enc).logits.double() / temperature, dim=-1).numpy()
    return np.pad(probs, ((0, 0), (0, num_classes - probs.shape[1])))


def check_ensemble_targets(root: Path, manifest: dict, g: int, said: list[str] | None = None) -> None:
    """Generation ``g`` of the finished run in ``root`` was taught by the mean of its recorded
    members' softmaxes: run.json names them (the last ``teacher.ensemble`` promoted generations
    before ``g``), its stored ``teacher_probs`` equal that mean on every row, and the console,
    report.md and ``g``'s model card name them."""
    cfg = manifest["config"]
    n = cfg["teacher"]["ensemble"]
    entry = manifest["generations"][g]
    promoted = [e["index"] for e in manifest["generations"][:g] if e.get("promoted") is not False]
    assert entry["ensemble"] == promoted[-n:] and len(entry["ensemble"]) >= 2, entry.get("ensemble")

    targets = pq.read_table(root / entry["targets"]).to_pandas().sort_values("row_id")
    stored = np.stack(targets["teacher_probs"].to_numpy())
    texts = [str(t) for t in targets["text"]]
    members = [member_softmax(root / manifest["generations"][i]["model"], texts, cfg["model"]["max_length"],
                              cfg["method"]["temperature"], stored.shape[1]) for i in entry["ensemble"]]
    np.testing.assert_allclose(stored, np.mean(members, axis=0), rtol=0, atol=1e-5)
    assert not np.allclose(members[0], members[-1], atol=1e-3)  # two different teachers, not one twice

    names = ", ".join(map(str, entry["ensemble"]))
    if said is not None:
        assert any(line.startswith(f"[gen {g}] teacher = mean softmax of generation(s) {names} (teacher.ensemble {n})")
                   for line in said), said
    assert f"| {g} | {names} |" in (root / "report.md").read_text()
    card = (root / entry["model"] / "README.md").read_text()
    assert f"student of the mean softmax of generations {names} (teacher.ensemble)" in card


def test_generation_two_learns_from_the_mean_of_generations_zero_and_one(ray_local, tmp_path, tiny_bert):
    from conftest import timings
    from incr_ray.run.loop import run_generations

    cfg = small_config(tmp_path, tiny_bert, "ensemble", data={"synthetic_rows": 600}, student={"epochs": 1},
                       eval={"retention_rows": 0}, teacher={"ensemble": 2})
    said: list[str] = []
    manifest = run_generations(cfg, say=said.append)
    timings("ensemble", manifest)
    root = Path(cfg.run_dir)
    assert json.loads((root / "run.json").read_text())["generations"][1]["ensemble"] == [0]  # one so far
    assert "[gen 1] teacher = mean softmax of generation(s) 0 (teacher.ensemble 2; 1 promoted so far)" in " ".join(said)
    check_ensemble_targets(root, manifest, 2, said)
