"""The representative memory and balanced fine-tuning in a real run (End-to-End Incremental
Learning, Castro et al. 2018): a k=2 run on the session's Ray with ``replay.selection: herding``
and ``student.balanced_epochs``, then an extension whose new data brings a class the run has never
seen (``--allow-new-labels``) and a larger memory (``--set replay.per_class``).

One scenario, M1 below; its checks are functions of a run folder (``check_memory``,
``check_balanced``), so they apply as they are to any run that keeps a memory: R5
(tests/test_job_submit_e2e.py) can take them with ``--set replay.fraction=0 --set
replay.per_class=N --set replay.selection=herding --set student.balanced_epochs=1`` on its extension.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from small_run import small_config

pytestmark = pytest.mark.e2e

NEW_LABEL = "yellow"  # the synthetic data's fourth class: the extension's new one


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory, tiny_bert):
    """M1: k=2 with a herding memory of 6 rows per old class and balanced fine-tuning, then an
    extension with a fourth class and 8 rows per old class."""
    from conftest import start_local_ray, timings
    from incr_ray.data import SYNTHETIC_LABELS, synthetic_rows
    from incr_ray.run.loop import extend_run, run_generations

    start_local_ray()
    work = tmp_path_factory.mktemp("memory")
    cfg = small_config(work / "runs", tiny_bert, "memory", data={"synthetic_rows": 600}, method={"k": 2},
                       student={"epochs": 1, "balanced_epochs": 2, "balanced_lr_factor": 0.1},
                       replay={"per_class": 6, "selection": "herding", "candidates_per_class": 30})
    said: list[str] = []
    trained = run_generations(cfg, say=said.append)
    texts, classes = synthetic_rows(np.arange(100_000, 100_240), seed=5, classes=4)
    new_data = work / "new_block.csv"
    pd.DataFrame({"text": texts, "label": np.array(SYNTHETIC_LABELS)[classes]}).to_csv(new_data, index=False)
    extended = extend_run(cfg.run_dir, str(new_data), ["replay.per_class=8"], say=said.append, allow_new_labels=True)
    timings("M1 memory", extended)
    return SimpleNamespace(cfg=cfg, trained=trained, manifest=extended, said=said, root=Path(cfg.run_dir))


# ---------------------------------------------------------------------------------------------
# The checks, for any run folder that keeps a memory


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


# ---------------------------------------------------------------------------------------------
# M1


def test_the_first_students_memory_is_herding_on_its_teacher(memory_run):
    check_memory(memory_run.root, memory_run.manifest, 1, memory_run.said, per_class=6)
    check_herding_is_reproduced(memory_run.root, memory_run.manifest, 1)
    assert memory_rows(memory_run.root, 1).label.nunique() == 3 and (memory_rows(memory_run.root, 1).block == 0).all()


def test_the_extension_keeps_a_memory_of_the_old_classes_only(memory_run):
    m = memory_run.manifest
    gen = m["generations"][2]
    assert m["label_names"][-1] == NEW_LABEL and gen["new_labels"] == [NEW_LABEL]
    assert gen["settings"] == {"replay.per_class": 8}  # an extension may change its own replay
    check_memory(memory_run.root, m, 2, memory_run.said, per_class=8)
    check_herding_is_reproduced(memory_run.root, m, 2)
    memory = memory_rows(memory_run.root, 2)
    assert NEW_LABEL not in set(memory.label) and set(memory.block) <= {0, 1}
    assert json.loads((memory_run.root / "run.json").read_text())["config"]["replay"]["per_class"] == 6  # the run's


def test_balanced_fine_tuning_runs_after_the_main_training_in_the_same_fit(memory_run):
    check_balanced(memory_run.manifest, 1, memory_run.said, per_class=6)
    check_balanced(memory_run.manifest, 2, memory_run.said, per_class=8)
    assert "balanced" not in memory_run.manifest["generations"][0]["train"]  # generation 0 has nothing to balance
    card = (memory_run.root / "gen_002" / "model" / "README.md").read_text()
    assert "| balanced fine-tuning |" in card
