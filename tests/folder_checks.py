"""Checks of a finished run folder that more than one scenario run could carry (R5 carries them
now): the representative memory and balanced fine-tuning (End-to-End Incremental Learning, Castro
et al. 2018), and the ensemble teacher (Hinton et al. 2015). Each takes the folder, its run.json as
a dict, the generation and what the console said."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest


def memory_rows(root: Path, g: int) -> pd.DataFrame:
    return pq.read_table(root / f"gen_{g:03d}" / "memory.parquet").to_pandas()


def check_memory(root: Path, manifest: dict, g: int, said: list[str], per_class: int) -> None:
    """gen_<g>/memory.parquet holds ``per_class`` rows of every old class (fewer where a class has
    fewer candidates), by class then herding rank; they and only they are the generation's replay
    rows in gen_<g>/targets; run.json and the console say so."""
    from incr_ray.config import config_from_dict
    from incr_ray.run.manifest import Manifest

    m = Manifest.model_validate(manifest)
    entry, cfg = m.generations[g], config_from_dict(m.config_of(g))
    memory = memory_rows(root, g)
    record = entry.memory
    assert set(memory.label) <= set(m.label_names_of(g - 1)) and memory.row_id.is_unique  # old classes only
    counts = memory.label.value_counts().to_dict()
    assert all(n <= per_class for n in counts.values()) and max(counts.values()) == per_class
    assert all(list(grp["rank"]) == list(range(len(grp))) for _, grp in memory.groupby("label_id"))
    assert (memory.distance >= 0).all()
    assert set(memory.selection) == {"herding"} and (memory.block < g).all() and (memory.block >= 0).all()
    targets = pq.read_table(root / entry.targets).to_pandas()
    replay = targets[targets.replay]
    assert sorted(set(replay.row_id)) == sorted(memory.row_id)  # the memory is what the student replays
    assert entry.replay_rows == len(replay) and "teacher_features" not in targets.columns
    assert record["path"] == f"gen_{g:03d}/memory.parquet" and record["rows"] == len(memory)
    assert record["selection"] == "herding" and record["per_class"] == per_class == cfg.replay.per_class
    assert record["per_label"] == counts and record["classes"] == len(counts)
    assert len(memory) <= record["candidates"] <= cfg.replay.candidates_per_class * len(counts)
    assert any(line.startswith(f"[gen {g}] memory: {len(memory)} rows of {len(counts)} old classes (up to "
                               f"{per_class} a class") and "by herding on the teacher's features" in line
               for line in said)
    card = (root / entry.model / "README.md").read_text()
    assert f"| memory | {len(memory)} rows of {len(counts)} old classes" in card


def check_herding_is_reproduced(root: Path, manifest: dict, g: int) -> None:
    """The memory is herding on the teacher's L2-normalised features of the candidates: scored
    again here by the teacher (same model, same rows), herding picks the same rows in the same order."""
    from incr_ray.config import config_from_dict
    from incr_ray.data.replay import memory_candidates
    from incr_ray.generation.teacher import TargetScorer
    from incr_ray.method.herding import class_memory
    from incr_ray.run.manifest import Manifest

    m = Manifest.model_validate(manifest)
    cfg = config_from_dict(m.config_of(g))
    candidates = memory_candidates(str(root / "split"), g, cfg.replay.candidates_per_class, cfg.run.seed,
                                   cfg.method.validation_fraction)
    split = pq.read_table(root / "split").to_pandas().drop_duplicates("row_id").set_index("row_id")
    rows = split.loc[candidates["row_id"]]
    scorer = TargetScorer(str(root / m.teacher_of(g).model), cfg, on_gpu=False, features=True,
                          num_classes=len(m.label_names_of(g)))
    out = scorer({"row_id": candidates["row_id"], "text": rows.text.to_numpy(dtype=object),
                  "label": candidates["label"], "block": candidates["block"],
                  "replay": np.ones(len(candidates["row_id"]), bool)})
    features = np.array(out.column("teacher_features").to_pylist())
    index, rank, _ = class_memory(features, candidates["label"], cfg.replay.per_class)
    memory = memory_rows(root, g)
    assert memory.row_id.tolist() == candidates["row_id"][index].tolist()
    assert memory["rank"].tolist() == rank.tolist()


def check_balanced(manifest: dict, g: int, said: list[str], per_class: int) -> None:
    """Balanced fine-tuning trained after the main steps in the same fit: its rows (at most
    ``per_class`` a class), steps, learning rate and loss in run.json, its plan on the console."""
    from incr_ray.config import config_from_dict
    from incr_ray.generation.trainer import steps_for
    from incr_ray.run.manifest import Manifest

    m = Manifest.model_validate(manifest)
    t, cfg = m.generations[g].train, config_from_dict(m.config_of(g))
    s, b = cfg.student, t["balanced"]
    classes = len(m.label_names_of(g))
    assert b["per_class"] == per_class and per_class < b["rows"] <= per_class * classes
    assert b["steps"] == steps_for(b["rows"], t["workers"], s.batch_size, s.balanced_epochs, s.grad_accum)
    assert t["steps"] == t["max_steps"] + b["steps"]  # the main steps, then the balanced pass, one train()
    assert b["learning_rate"] == pytest.approx(s.learning_rate * s.balanced_lr_factor)
    assert b["epochs"] == s.balanced_epochs and np.isfinite(b["loss_mean"])
    assert (f"[gen {g}] then balanced fine-tuning: {b['steps']} optimizer steps on {b['rows']} rows (up to "
            f"{per_class} a class) at learning rate {b['learning_rate']:g}") in said


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
