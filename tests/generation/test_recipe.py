"""The student recipe without Ray: two gloo ranks (``torch.multiprocessing``) train a tiny BERT under
DeepSpeed ZeRO-3 on the CPU, in full, with LoRA, then in full again, then with LoRA from the model
with its head grown for a fourth label (extend --allow-new-labels); the checks then read what they
saved, afresh, in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

LABELS = ["c0", "c1", "c2"]
WORDS = ["apple", "river", "guitar"]  # one per class: learnable in a few steps


def rows(n: int, seed: int) -> dict[str, np.ndarray]:
    labels = np.random.default_rng(seed).integers(0, len(LABELS), n)
    text = np.array([f"{WORDS[c]} and word {i} then {WORDS[c]}" for i, c in enumerate(labels)], dtype=object)
    return {"text": text, "label": labels, "row_id": np.arange(n) + 1000 * seed}


def batches(data: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, len(data["label"]), size)]


def config(model: str, lora_r: int = 0):
    from incr_ray.config import config_from_dict

    return config_from_dict({
        "model": {"base": model, "max_length": 24},
        "student": {"batch_size": 8, "epochs": 2, "min_steps": 0, "learning_rate": 5e-3, "warmup_ratio": 0.0, "lora": {"r": lora_r, "alpha": 8}},
        "deepspeed": {"stage": 3, "precision": "fp32"},
        "cluster": {"workers": 2, "use_gpu": False, "cpus_per_worker": 1},
        "teacher": {"cpus_per_actor": 1},
        "eval": {"batch_size": 8},  # 30 holdout rows: uneven last batch, split over the ranks
    })


TRAIN_ROWS, HOLDOUT = 96, rows(30, seed=1)
RUNS = {"full": 0, "lora": 4, "again": 0, "grown": 4}  # student.lora.r; "again" repeats "full"
GROWN = "grown-initial"  # the tiny BERT with its head grown for a fourth label, in the output folder


def _rank(rank: int, model: str, port: int, out: str) -> None:
    """One rank of the group: the runs, one after the other, as a Ray Train worker runs one."""
    from incr_ray.generation.local_group import start_local_group
    from incr_ray.generation.recipe import StudentRequest, run_student
    from incr_ray.generation.shards import RankStream, rank_rows
    from incr_ray.generation.trainer import Collated, generation_steps

    start_local_group(rank, 2, port)
    run = rank_rows(TRAIN_ROWS, 2)[rank]  # this rank's rows, as Ray Train's workers get them (shards.RankShards)
    mine = batches({k: v[run.start:run.stop] for k, v in rows(TRAIN_ROWS, seed=0).items()}, 8)
    report = {}
    for name, r in RUNS.items():
        cfg = config(model, r)
        grown = name == "grown"
        request = StudentRequest(generation=0, init_model=os.path.join(out, GROWN) if grown else model,
                                 label_names=LABELS + ["c3"] if grown else LABELS, rows=TRAIN_ROWS,
                                 model_dest="unused", ray_storage="unused",
                                 predictions_dest=os.path.join(out, f"{name}-predictions.parquet"))
        work = os.path.join(out, f"{name}-rank{rank}")
        os.makedirs(work)
        steps = generation_steps(cfg, TRAIN_ROWS)
        stream = lambda collate: RankStream(lambda: Collated(mine, collate), steps * cfg.student.grad_accum)  # noqa: E731
        report[name] = run_student(cfg, request, stream,
                                   {"holdout": batches(HOLDOUT, cfg.eval.batch_size)}, rank=rank, world=2,
                                   work=work, on_gpu=False, max_steps=steps)
    if rank == 0:
        Path(out, "metrics.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    """Both runs on 2 ranks, in a fresh interpreter (DeepSpeed's CPU accelerator is chosen at import)."""
    from incr_ray.generation.local_group import free_port

    from incr_ray.heads import grow_head_folder

    out = tmp_path_factory.mktemp("recipe")
    grow_head_folder(tiny_bert, str(out / GROWN), LABELS + ["c3"], seed=0)
    code = ("import sys, torch.multiprocessing as mp\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_recipe import _rank\n"
            f"mp.spawn(_rank, args=({tiny_bert!r}, {free_port()}, {str(out)!r}), nprocs=2)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, json.loads((out / "metrics.json").read_text())


def _weights(folder) -> dict[str, torch.Tensor]:
    """A folder's saved tensors by name. Handed ZeRO-3's gathered state dict, transformers writes
    BERT's LayerNorm weights under their legacy names (gamma, beta); it reads both alike."""
    from safetensors.torch import load_file

    legacy = {".gamma": ".weight", ".beta": ".bias"}
    return {next((k[:-len(old)] + new for old, new in legacy.items() if k.endswith(old)), k): v
            for k, v in load_file(str(Path(folder) / "model.safetensors")).items()}


def test_zero3_saves_one_consolidated_trained_model(trained, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    out, metrics = trained
    m = metrics["full"]
    assert (m["zero_stage"], m["workers"], m["steps"], m["resumed_from_step"]) == (3, 2, 12, 0)  # 2 epochs of 6 batches
    assert m["precision"]["model_weights"] == "fp32" and m["total_params"] == m["trainable_params"]
    initial, saved = _weights(tiny_bert), _weights(out / "full-rank0" / "model")
    # Full shapes (not ZeRO-3's empty partitions), and training moved nearly every tensor.
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in initial.items()}
    moved = [k for k in initial if not torch.equal(initial[k], saved[k])]
    assert len(moved) >= 0.9 * len(initial), sorted(set(initial) - set(moved))
    model = AutoModelForSequenceClassification.from_pretrained(out / "full-rank0" / "model")
    assert model.config.id2label == dict(enumerate(LABELS))
    assert json.loads((out / "full-rank0" / "model" / "incr_ray.json").read_text())["label_names"] == LABELS
    assert not (out / "full-rank0" / "model" / "training_args.bin").exists()


@pytest.mark.parametrize("run", list(RUNS))
def test_in_memory_evaluation_matches_the_saved_model(trained, tiny_bert, run):
    """Two ranks scoring their shares of each holdout batch of the model they saved give the figures
    (and the predictions) of the saved folder loaded afresh and scored by one process."""
    from incr_ray.generation.evaluation import evaluate_student, read_predictions
    from incr_ray.modeling import load_for_inference

    out, metrics = trained
    cfg = config(tiny_bert)
    model, tokenizer = load_for_inference(str(out / f"{run}-rank0" / "model"), cfg, on_gpu=False)
    fresh = evaluate_student(model, tokenizer, {"holdout": batches(HOLDOUT, cfg.eval.batch_size)}, cfg)
    in_memory = metrics[run]["holdout"]
    assert in_memory["n"] == fresh["holdout"]["n"] == 30
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert in_memory[k] == pytest.approx(fresh["holdout"][k], rel=1e-5), k
    ids, classes = read_predictions(str(out / f"{run}-predictions.parquet"))
    assert sorted(zip(ids.tolist(), classes.tolist())) == sorted(zip(*(a.tolist() for a in fresh["predictions"])))


def test_the_same_seed_gives_the_same_weights_on_two_ranks(trained):
    """Each rank's batches depend on the rows, the seed and the world only (shards.rank_rows, the
    RankStream Ray Train's workers also read), and the recipe seeds the rest from run.seed: the full
    run again, after the LoRA run in the same processes, saves the same weights bit for bit. (That
    Ray Train gives each rank the same batches every time: tests/generation/test_shards.py.)"""
    out, metrics = trained
    first, again = _weights(out / "full-rank0" / "model"), _weights(out / "again-rank0" / "model")
    assert first.keys() == again.keys()
    assert [k for k in first if not torch.equal(first[k], again[k])] == []
    assert metrics["again"]["train_loss"] == metrics["full"]["train_loss"]


def test_lora_under_zero3_saves_its_adapter_merged_into_the_initial_model(trained, tiny_bert):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out, metrics = trained
    m = metrics["lora"]
    # query and value of 2 layers at r=4 (A: 4×32, B: 32×4), and the 3×32 head with its bias.
    assert (m["trainable_params"], m["total_params"]) == (2 * 2 * 4 * 64 + 3 * 32 + 3, metrics["full"]["total_params"])
    folder = out / "lora-rank0"
    assert sorted(p.name for p in (folder / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    initial, saved = _weights(tiny_bert), _weights(folder / "model")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    merged = PeftModel.from_pretrained(base, str(folder / "adapter")).merge_and_unload().state_dict()
    assert set(saved) == set(initial)
    for name, weight in saved.items():
        torch.testing.assert_close(weight, merged[name], rtol=0, atol=1e-6, msg=name)
    adapted = [k for k in initial if k.endswith((".query.weight", ".value.weight")) or k.startswith("classifier.")]
    for name in initial:  # not adapted: the initial weights, bit for bit
        if name in adapted:
            assert not torch.equal(saved[name], initial[name]), name
        else:
            assert torch.equal(saved[name], initial[name]), name


def test_a_grown_head_trains_in_full_under_zero3_with_lora(trained):
    """The initial model of an extension that added a label: its 4-row head loads partitioned at
    its size (no resize), trains in full beside the adapters, and the merged model keeps 4 labels."""
    from transformers import AutoModelForSequenceClassification

    out, metrics = trained
    m = metrics["grown"]
    assert m["zero_stage"] == 3 and m["trainable_params"] == 2 * 2 * 4 * 64 + 4 * 32 + 4
    initial, saved = _weights(out / GROWN), _weights(out / "grown-rank0" / "model")
    assert saved["classifier.weight"].shape == (4, 32) and set(saved) == set(initial)
    assert not torch.equal(saved["classifier.weight"][3], initial["classifier.weight"][3])
    for name in initial:  # neither adapted nor the head: the initial weights, bit for bit
        if not (name.endswith((".query.weight", ".value.weight")) or name.startswith("classifier.")):
            assert torch.equal(saved[name], initial[name]), name
    model = AutoModelForSequenceClassification.from_pretrained(out / "grown-rank0" / "model")
    assert model.config.id2label == dict(enumerate(LABELS + ["c3"]))

