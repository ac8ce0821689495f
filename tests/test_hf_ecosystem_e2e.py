"""What a Hugging Face user brings and expects, in one `incr-ray train` (a subprocess on a local Ray):
a `datasets` folder as input, LoRA students, MLflow tracking into a local SQLite store, a model card
in every model folder, and `incr-ray status` on the running and the finished run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml

from incr_ray.data.synthetic import synthetic_rows

pytestmark = pytest.mark.e2e

CLASSES = ["calm", "storm", "drizzle"]  # ClassLabel ids in this order, on purpose not sorted


def _saved_dataset(folder: Path) -> str:
    features = datasets.Features({"sentence": datasets.Value("string"), "weather": datasets.ClassLabel(names=CLASSES)})

    def part(first: int, n: int) -> datasets.Dataset:
        texts, labels = synthetic_rows(np.arange(first, first + n), seed=7, classes=len(CLASSES))
        return datasets.Dataset.from_dict({"sentence": texts, "weather": [int(x) for x in labels]}, features=features)

    datasets.DatasetDict({"train": part(0, 640), "test": part(10_000, 120)}).save_to_disk(str(folder))
    return str(folder)


def _status(run_dir: str) -> str:
    out = subprocess.run([sys.executable, "-m", "incr_ray.cli", "status", "--run", run_dir],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_datasets_folder_lora_students_mlflow_cards_and_status(tmp_path, tiny_bert):
    config = {
        "run": {"name": "hf", "seed": 3},
        "storage": {"path": str(tmp_path / "runs")},
        "data": {"source": _saved_dataset(tmp_path / "weather"), "text_column": "sentence",
                 "label_column": "weather", "eval_split": "test"},
        "model": {"base": tiny_bert, "max_length": 24},
        "method": {"k": 2},
        # Enough steps that a status call lands while generation 0 trains.
        "student": {"epochs": 3, "min_steps": 0, "learning_rate": 5e-3, "batch_size": 8,
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        "tracking": {"backend": "mlflow"},
        "teacher": {"batch_size": 128},
    }
    cfg_file = tmp_path / "hf.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    run_dir = str(tmp_path / "runs" / "hf")
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "incr_ray.cli", "train", "--config", str(cfg_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        # While it runs: status from the folder alone, once rank 0 has written a progress.json.
        running = None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if list(Path(run_dir).glob("gen_*/progress.json")):
                running = _status(run_dir)
                break
            time.sleep(2)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    assert running is not None, "no progress.json appeared while the run trained: " + out[-3000:]
    # Which generation, and whether in a step or between generations, depends on timing.
    assert "): running" in running and ("generation 1 of 2" in running or "generation(s) of 2 finished" in running
                                        or "generation 0 of 2" in running), running
    _check_finished_run(tmp_path, run_dir, tiny_bert)


def _check_finished_run(tmp_path: Path, run_dir: str, tiny_bert: str) -> None:
    from huggingface_hub import ModelCard
    from mlflow.tracking import MlflowClient
    from transformers import pipeline

    finished = _status(run_dir)
    assert "): finished" in finished and "(generation 1)" in finished, finished

    # The datasets folder's ClassLabel names are the labels, and the holdout is the test split.
    manifest = json.loads((Path(run_dir) / "run.json").read_text())
    assert manifest["label_names"] == CLASSES
    assert manifest["data"]["holdout_size"] == 120

    # LoRA: each generation kept its adapter beside a plain merged model.
    for g in (0, 1):
        adapter = Path(run_dir) / f"gen_{g:03d}" / "adapter"
        assert (adapter / "adapter_config.json").is_file(), g
        assert manifest["generations"][g]["train"]["trainable_params"] < manifest["generations"][g]["train"]["total_params"]

    # Model cards: the base model (a local folder: named, not linked) and the teacher chain.
    for g in (0, 1):
        card = ModelCard.load(str(Path(run_dir) / f"gen_{g:03d}" / "model" / "README.md"))
        assert card.data.pipeline_tag == "text-classification" and card.data.library_name == "transformers"
        assert Path(tiny_bert).name in card.text
        assert ("gen 1 ← gen 0 ← base model" if g == 1 else "gen 0 ← base model") in card.text
        assert "LoRA" in card.text

    # The final merged model loads in a plain transformers pipeline with the dataset's label names.
    classify = pipeline("text-classification", model=str(Path(run_dir) / "gen_001" / "model"))
    texts, _ = synthetic_rows(np.arange(20_000, 20_004), seed=7, classes=len(CLASSES))
    assert {p["label"] for p in classify(list(texts))} <= set(CLASSES)

    # MLflow: one parent run with the config as params, one nested run per generation with the
    # per-step loss and the holdout accuracy run.json recorded.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("incr-ray").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["generation"]))
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].data.params["student.lora.r"] == "4"
    assert parents[0].info.status == "FINISHED"
    for g, child in enumerate(children):
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert len(client.get_metric_history(child.info.run_id, "loss")) > 1
        assert child.data.metrics["holdout/accuracy"] == pytest.approx(manifest["generations"][g]["metrics"]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert "report.md" in artifacts
