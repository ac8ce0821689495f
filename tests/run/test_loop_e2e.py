"""End-to-end runs of the generation loop on a local Ray: real Ray Data, Ray Train, DeepSpeed.

Each ``TorchTrainer.fit()`` costs ~30 s here, so these few tests check as much as they can per run.
"""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from incr_ray import faults
from incr_ray.faults import StopRequested
from incr_ray.method.hashing import validation_mask
from incr_ray.method.targets import soft_targets
from incr_ray.run.loop import run_generations
from small_run import small_config

pytestmark = pytest.mark.e2e


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _worker_folders() -> set[str]:
    """The training workers' scratch folders (each holds a copy of its generation's model)."""
    import glob
    import tempfile

    return set(glob.glob(f"{tempfile.gettempdir()}/incr-ray-g*-r*-*"))


def test_k3_run_end_to_end(ray_local, tmp_path, tiny_bert):
    """The whole method, with the levers that change what a generation measures and saves: a
    validation slice, temperature scaling folded into the saved head, teacher annealing and the
    run-long learning-rate schedule."""
    cfg = small_config(tmp_path, tiny_bert, "k3", method={"validation_fraction": 0.2, "calibrate": True, "anneal": True},
                       student={"schedule": "run", "warmup_ratio": 0.2}, eval={"retention_rows": 100})
    scratch_before = _worker_folders()
    manifest = run_generations(cfg, say=lambda s: None)
    # Every worker removed its scratch folder: a run leaves no model copies in the temp folder.
    assert _worker_folders() <= scratch_before
    root = Path(cfg.run_dir)
    on_disk = json.loads((root / "run.json").read_text())
    assert on_disk["status"] == "finished"
    gens = on_disk["generations"]
    assert [g["index"] for g in gens] == [0, 1, 2]
    assert all(g["status"] == "finished" for g in gens)
    for g in gens:
        assert set(g["metrics"]) >= {"accuracy", "macro_f1", "nll", "ece"}
    label_names = on_disk["label_names"]
    assert len(label_names) == 3

    split = pq.read_table(root / "split").to_pandas()
    assert on_disk["data"]["block_sizes"] == [int((split.block == b).sum()) for b in range(3)]

    for g in (1, 2):
        targets = pq.read_table(root / f"gen_{g:03d}" / "targets").to_pandas()
        block_ids = split.row_id[split.block == g]
        # Each row of the block is scored exactly once (ids are content hashes: compare multisets).
        assert collections.Counter(targets.row_id) == collections.Counter(block_ids)
        assert gens[g]["rows"] == len(block_ids)
        # The targets the pipeline wrote are exactly the pure rule applied to the teacher's outputs.
        probs = np.stack(targets.teacher_probs.to_numpy())
        expected = soft_targets(probs, targets.label.to_numpy(), threshold=0.9, floor=None)
        np.testing.assert_allclose(np.stack(targets.target.to_numpy()), expected, rtol=0, atol=1e-12)
        assert (np.stack(targets.target.to_numpy())[np.arange(len(targets)), targets.label] >= 0.9 - 1e-9).all()
        # What the teacher and the rule did on the block, read back from those same targets.
        t = gens[g]["teacher_on_block"]
        assert t["rows"] == len(block_ids)
        assert t["accuracy"] == pytest.approx((probs.argmax(1) == targets.label.to_numpy()).mean())
        assert t["kept"] + t["pushed"] + t["floored"] == pytest.approx(1.0) and t["floored"] == 0
        # The validation slice: the block's rows the seeded hash picks, never trained on.
        validation = int(validation_mask(block_ids.to_numpy(), cfg.run.seed, 0.2).sum())
        assert gens[g]["validation"]["rows"] == validation and 0.1 < validation / len(block_ids) < 0.3
        assert gens[g]["train"]["rows"] == len(block_ids) - validation
        assert 0 <= gens[g]["validation"]["teacher_accuracy"] <= 1
        # Continual figures against the teacher, and retention on ~100 rows of earlier blocks.
        c = gens[g]["continual"]
        assert 0 <= c["flip_rate"] <= 1 and 0 <= c["fix_rate"] <= 1 and 50 < c["retention_rows"] < 150
    assert "continual" not in gens[0]
    assert gens[0]["train"]["rows"] == gens[0]["rows"] - gens[0]["validation"]["rows"]
    for g in gens:  # calibrated: run.json's holdout figures are those after temperature scaling
        cal = g["calibration"]
        assert cal["temperature"] > 0 and g["metrics"]["ece"] == pytest.approx(cal["ece_after"])
        assert g["metrics"]["nll"] == pytest.approx(cal["nll_after"]) and g["promoted"] is True
    assert manifest["final_generation"] == 2

    # Every model folder carries its model card: the base model, the teacher chain, the final one named.
    from huggingface_hub import ModelCard

    for g in range(3):
        card = ModelCard.load(root / f"gen_{g:03d}" / "model" / "README.md")
        assert card.data.library_name == "transformers" and "incr-ray" in card.data.tags
        assert card.data.base_model is None  # tiny_bert is a folder here, named by its folder name only
        assert f"a model folder named `{Path(tiny_bert).name}`" in card.text and str(tmp_path) not in card.content
        chain = " ← ".join(f"gen {i}" for i in range(g, -1, -1)) + " ← base model"
        assert chain in card.text, card.text
        assert {r.metric_type: r.metric_value for r in card.data.eval_results}["accuracy"] == \
            pytest.approx(gens[g]["metrics"]["accuracy"], abs=1e-4)
        assert ("This is the **final model**" in card.text) == (g == 2)
        assert "| temperature scaling | temperature " in card.text
        assert ("| teacher annealing | on" in card.text) == (g > 0)  # generation 0 learns one-hot labels

    from transformers import pipeline

    for g in range(3):
        clf = pipeline("text-classification", model=str(root / f"gen_{g:03d}" / "model"), device="cpu")
        out = clf(["some words here", "other words"])
        assert {o["label"] for o in out} <= set(label_names)
    # A learnable task: the final model must beat chance (1/3) clearly on the holdout.
    assert gens[-1]["metrics"]["accuracy"] > 0.5, gens[-1]["metrics"]
    for f in ("report.md", "report.json", "generations.png"):
        assert (root / f).stat().st_size > 0
    assert "## What the teacher and the target rule did" in (root / "report.md").read_text()
    assert manifest["final_model"] == "gen_002/model"

    # `incr-ray evaluate`: the final model on the holdout reproduces run.json's figures, and a
    # labelled file can be evaluated instead.
    from incr_ray.run.loop import evaluate_run

    [(g, metrics)] = evaluate_run(str(root))
    # The saved folder carries the fitted temperature: scored afresh it gives the calibrated figures.
    assert g == 2 and metrics == pytest.approx(gens[2]["metrics"])
    holdout = split[split.block == -1]
    csv = root.parent / "eval.csv"
    holdout.assign(label=[label_names[i] for i in holdout.label])[["text", "label"]].to_csv(csv, index=False)
    per_gen = evaluate_run(str(root), str(csv), all_generations=True)
    assert [g for g, _ in per_gen] == [0, 1, 2]
    assert per_gen[2][1]["accuracy"] == pytest.approx(gens[2]["metrics"]["accuracy"])


def test_zero3_two_workers_and_resume(ray_local, tmp_path, tiny_bert, monkeypatch):
    """ZeRO-3 on 2 workers saves a consolidated trained model; a stopped run resumes cleanly, and
    MLflow tracking follows it into the same parent run."""
    cfg = small_config(
        tmp_path, tiny_bert, "resume",
        method={"k": 2},
        deepspeed={"stage": 3},
        cluster={"workers": 2},
        tracking={"backend": "mlflow"},
    )
    said = []
    monkeypatch.setenv(faults.ENV, json.dumps({"stop_after_generation": 0}))  # the driver reads it
    with pytest.raises(StopRequested):
        run_generations(cfg, say=said.append)
    monkeypatch.delenv(faults.ENV)
    root = Path(cfg.run_dir)
    state = json.loads((root / "run.json").read_text())
    assert [g["status"] for g in state["generations"]] == ["finished"]
    model0 = root / "gen_000" / "model" / "model.safetensors"
    before = _sha(model0)
    card0 = root / "gen_000" / "model" / "README.md"  # written before the generation counted as finished
    assert "while the run went on" in card0.read_text()

    # Consolidated ZeRO-3 weights: full shapes, and trained (differ from the initial weights).
    from safetensors.numpy import load_file

    trained = load_file(str(model0))
    initial = load_file(str(Path(tiny_bert) / "model.safetensors"))
    emb = "bert.embeddings.word_embeddings.weight"
    assert trained[emb].shape == initial[emb].shape
    changed = [k for k in initial if k in trained and trained[k].shape == initial[k].shape
               and not np.allclose(trained[k], initial[k])]
    assert len(changed) > len(initial) // 2, "most weights should have moved during training"
    assert state["generations"][0]["metrics"]["accuracy"] > 0.45

    manifest = run_generations(cfg, say=said.append)
    assert [g["status"] for g in manifest["generations"]] == ["finished", "finished"]
    assert _sha(model0) == before, "generation 0 must not be retrained on resume"
    # The resumed run's end re-renders every card: generation 0's now names the final model.
    assert "Run `resume`'s final model is generation 1." in card0.read_text()
    assert "This is the **final model**" in (root / "gen_001" / "model" / "README.md").read_text()
    assert manifest["generations"][0]["metrics"] == state["generations"][0]["metrics"]
    _check_tracking(tmp_path / "mlflow.db", state, manifest, said)

    # The workers evaluated their partitioned (ZeRO-3) model in memory; the saved, consolidated
    # weights scored by the actor pool (`incr-ray evaluate`) must give the same figures.
    from incr_ray.run.loop import evaluate_run

    for g, metrics in evaluate_run(str(root), all_generations=True):
        assert metrics == pytest.approx(manifest["generations"][g]["metrics"], rel=1e-5), g


def _check_tracking(db: Path, stopped: dict, manifest: dict, said: list[str]) -> None:
    """The run's MLflow record, read back from its SQLite store: one parent run across the stop and
    the resume, one nested run per generation with rank 0's per-step loss."""
    from mlflow.tracking import MlflowClient

    assert not [s for s in said if "warning: MLflow" in s], said
    parent = manifest["tracking_run_id"]
    assert parent and stopped["tracking_run_id"] == parent  # the resume continued the same run
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.info.run_name == "resume"
    assert run.data.params["method.k"] == "2" and run.data.params["deepspeed.stage"] == "3"
    assert run.data.params["cluster.workers"] == "2" and run.data.params["tracking.backend"] == "mlflow"
    final = manifest["generations"][1]["metrics"]
    assert run.data.metrics["final/accuracy"] == pytest.approx(final["accuracy"])
    assert {a.path for a in client.list_artifacts(parent)} == {"report.md", "report.json", "generations.png"}
    nested = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    by_gen = {int(r.data.tags["generation"]): r for r in nested}
    assert sorted(by_gen) == [0, 1]
    for g, entry in enumerate(manifest["generations"]):
        r = by_gen[g]
        assert r.info.run_id == entry["tracking_run_id"] and r.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        # Logged by rank 0 alone: each logging step once, up to the generation's last step.
        assert len(steps) > 1 and sorted(steps) == sorted(set(steps)), steps
        assert max(steps) <= entry["train"]["steps"]
        assert len(client.get_metric_history(r.info.run_id, "learning_rate")) == len(steps)
        assert r.data.metrics["holdout/accuracy"] == pytest.approx(entry["metrics"]["accuracy"])
        assert r.data.metrics["generation/rows"] == entry["rows"]
    assert by_gen[1].data.metrics["teacher_on_block/kept"] == pytest.approx(manifest["generations"][1]["teacher_on_block"]["kept"])


def test_changed_config_is_refused_on_resume(ray_local, tmp_path, tiny_bert):
    """No training needed: the refusal comes from the manifest written by the split step."""
    from incr_ray.run.folder import open_run
    from incr_ray.run.manifest import RunError

    cfg = small_config(tmp_path, tiny_bert, "changed")
    with open_run(cfg, say=lambda s: None):
        pass
    changed = small_config(tmp_path, tiny_bert, "changed", method={"threshold": 0.8})
    with pytest.raises(RunError, match=r"method.threshold: 0.9 -> 0.8"):
        with open_run(changed, say=lambda s: None):
            pass



def test_zero3_with_a_head_of_another_size_is_refused_before_anything_is_written(ray_local, tmp_path, tiny_bert):
    """The tiny model's trained head has 3 labels; two-class data under ZeRO-3 would fail on rank 0
    alone mid-load. The run refuses after reading the data, before writing the run folder."""
    from incr_ray.config import ConfigError
    from incr_ray.run.folder import open_run

    cfg = small_config(tmp_path, tiny_bert, "head", data={"synthetic_classes": 2}, deepspeed={"stage": 3})
    with pytest.raises(ConfigError, match="head for 3 labels but the data has 2.*deepspeed.stage 2"):
        with open_run(cfg, say=lambda s: None):
            pass
    assert not (tmp_path / "head").exists()


def test_replay_rows_come_from_earlier_blocks(ray_local, tmp_path, tiny_bert):
    """Scoring only (no training): block 2 plus ~r·|S_2| rows re-sampled from blocks 0-1."""
    from ray.data.expressions import col

    from incr_ray.run.folder import open_run
    from incr_ray.run.loop import score_generation

    cfg = small_config(tmp_path, tiny_bert, "replay", replay={"fraction": 0.5})
    with open_run(cfg, say=lambda s: None) as run:
        block = run.split_dataset().filter(expr=col("block") == 2)
        rows = score_generation(run, 2, block, tiny_bert)
    targets = pq.read_table(Path(cfg.run_dir) / "gen_002" / "targets").to_pandas()
    block_rows = run.manifest.data.block_sizes[2]
    replay = targets[targets.replay]
    assert rows == len(targets) == block_rows + len(replay)
    assert (targets[~targets.replay].block == 2).all() and set(replay.block) <= {0, 1}
    assert 0.3 * block_rows < len(replay) < 0.7 * block_rows  # ≈ 0.5·|S_2|, a seeded sample
    assert run.manifest.generations[2].replay_rows == len(replay)


def test_threshold_one_trains_on_labels_without_scoring(ray_local, tmp_path, tiny_bert):
    """At method.threshold 1 every target is the one-hot label: no teacher pool starts, replay
    rows still join the block, and run.json counts them as a scored generation's would."""
    from ray.data.expressions import col

    from incr_ray.run.folder import open_run
    from incr_ray.run.loop import one_hot_generation

    said: list[str] = []
    cfg = small_config(tmp_path, tiny_bert, "onehot", method={"threshold": 1.0}, replay={"fraction": 0.5})
    assert not cfg.method.needs_teacher
    assert cfg.model_copy(update={"method": cfg.method.model_copy(update={"keep_best": True})}).method.needs_teacher
    with open_run(cfg, say=said.append) as run:
        block = run.split_dataset().filter(expr=col("block") == 2).materialize()
        rows = one_hot_generation(run, 2, block).to_pandas()
        entry = run.manifest.generations[2]
    block_rows = run.manifest.data.block_sizes[2]
    assert list(rows.columns) == ["row_id", "text", "label"] and rows.row_id.is_unique
    assert entry.rows == len(rows) and entry.block_rows == block_rows
    assert 0.3 * block_rows < entry.replay_rows < 0.7 * block_rows  # the same seeded sample as a scored one
    assert entry.targets is None and not (Path(cfg.run_dir) / "gen_002" / "targets").exists()
    assert "[gen 2] no teacher scoring: at method.threshold 1 every target is the one-hot label" in said


def test_bf16_on_cpu_trains_with_fp32_targets_and_accumulation(ray_local, tmp_path, tiny_bert, capsys):
    """Half precision runs in the suite: DeepSpeed's CPU accelerator trains in bf16. The targets
    reach the loss in fp32 (the Trainer would cast them to bf16), gradients accumulate in fp32
    beside fp32 master weights, and run.json says so for every generation. (The cheapest whole
    run of the suite, so it also checks the progress a user watches: step lines, the teacher
    scoring's tenths, progress.json and `incr-ray status`.)"""
    from transformers import pipeline

    from incr_ray import cli

    cfg = small_config(tmp_path, tiny_bert, "bf16", method={"k": 2}, data={"synthetic_rows": 600},
                       student={"epochs": 1}, deepspeed={"stage": 1, "precision": "bf16"})
    said: list[str] = []
    manifest = run_generations(cfg, say=said.append)
    for g in manifest["generations"]:
        assert g["train"]["precision"] == {
            "requested": "bf16", "model_weights": "bf16", "master_weights": "fp32", "grad_accum": "fp32",
            "loss_targets": "fp32", "loss_logits": "bf16",
        }, g["train"]["precision"]
        assert all(np.isfinite(v) for v in g["metrics"].values())
        # Where a fit's time went: Ray Train's start-up and shutdown around the worker function,
        # and the CPUs `auto` gave the one worker (the test's Ray has 2).
        t = g["train"]
        assert 0 < t["fit_startup_seconds"] and 0 <= t["fit_shutdown_seconds"]
        assert t["fit_startup_seconds"] + t["setup_seconds"] + t["train_seconds"] < t["fit_seconds"]
        assert t["cpus_per_worker"] == 2
    assert "cluster.cpus_per_worker auto -> 2 for 1 worker(s) (2 CPUs on 1 node(s))" in said
    final = Path(cfg.run_dir) / manifest["final_model"]
    out = pipeline("text-classification", model=str(final), device="cpu")(["red words"])
    assert out[0]["label"] in manifest["label_names"]

    # Step lines with throughput and ETAs; a teacher-scoring line per tenth (the test's stdout is
    # no terminal); each generation's last progress.json.
    steps = [line for line in said if " step " in line and " loss " in line]
    assert steps and all("rows/s" in line and "tokens/s" in line and "ETA gen" in line for line in steps[1:]), said
    assert any(line.startswith("[gen 1] teacher scored 100% (") for line in said), said
    root = Path(cfg.run_dir)
    for g in manifest["generations"]:
        p = json.loads((root / f"gen_{g['index']:03d}" / "progress.json").read_text())
        assert p["generation"] == g["index"] and p["step"] == p["max_steps"] == g["train"]["max_steps"]
        assert p["loss"] > 0 and p["rows_per_s"] > 0 and p["tokens_per_s"] > 0 and p["eta_generation_s"] == 0
        last = g["index"] == len(manifest["generations"]) - 1
        assert (p["eta_run_s"] == 0) == last and p["updated_at"].endswith("+00:00")  # gen 1's steps were still ahead
    # `incr-ray status` of the finished run: the final model and its holdout metrics, without Ray.
    capsys.readouterr()
    assert cli.main(["status", "--run", str(root)]) == 0
    out = capsys.readouterr().out
    final_metrics = manifest["generations"][manifest["final_generation"]]["metrics"]
    assert "run 'bf16'" in out and ": finished" in out, out
    assert f"final model {manifest['final_model']} (generation {manifest['final_generation']}): " \
           f"holdout accuracy {final_metrics['accuracy']:.4f}" in out, out
