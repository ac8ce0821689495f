"""EWC through the student recipe without Ray: two gloo ranks train a tiny BERT with LoRA under
DeepSpeed ZeRO-2 on the CPU, twice — generation 0 stores its Fisher, generation 1 starts from
generation 0's merged model with fresh adapters and pays the penalty against that file. (R1,
tests/run/test_reference_run.py, covers a full fine-tune at ZeRO-2 through Ray.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a fresh interpreter, two processes, four DeepSpeed starts

TRAIN_ROWS = 64


def _rank(rank: int, model: str, port: int, out: str) -> None:
    import torch

    from incr_ray.config import config_from_dict
    from incr_ray.generation.local_group import start_local_group
    from incr_ray.generation.recipe import FISHER, MODEL, StudentRequest, run_student
    from incr_ray.generation.shards import RankStream, rank_rows
    from incr_ray.generation.trainer import Collated, generation_steps
    from test_recipe import HOLDOUT, LABELS, batches, config, rows

    start_local_group(rank, 2, port)
    run = rank_rows(TRAIN_ROWS, 2)[rank]
    mine = batches({k: v[run.start:run.stop] for k, v in rows(TRAIN_ROWS, seed=0).items()}, 8)
    report, init, anchor = {}, model, None
    for g in (0, 1):
        cfg = config_from_dict(config(model, lora_r=4).to_dict(),
                               ["deepspeed.stage=2", "method.ewc=100", "method.ewc_rows=16"])
        request = StudentRequest(generation=g, init_model=init, label_names=LABELS, rows=TRAIN_ROWS,
                                 model_dest="unused", ray_storage="unused", fisher_dest="unused", ewc_anchor=anchor)
        work = os.path.join(out, f"gen{g}-rank{rank}")
        os.makedirs(work)
        steps = generation_steps(cfg, TRAIN_ROWS)
        stream = lambda collate: RankStream(lambda: Collated(mine, collate), steps * cfg.student.grad_accum)  # noqa: E731
        report[g] = run_student(cfg, request, stream, {"holdout": batches(HOLDOUT, cfg.eval.batch_size)}, rank=rank,
                                world=2, work=work, on_gpu=False, max_steps=steps)
        init, anchor = os.path.join(out, f"gen{g}-rank0", MODEL), os.path.join(out, f"gen{g}-rank0", FISHER)
        torch.distributed.barrier()  # rank 0's model and Fisher are complete for the next generation
    if rank == 0:
        Path(out, "metrics.json").write_text(json.dumps(report))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    from incr_ray.generation.local_group import free_port

    out = tmp_path_factory.mktemp("ewc_recipe")
    code = ("import sys, torch.multiprocessing as mp\n"
            f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
            "from test_ewc_recipe import _rank\n"
            f"mp.spawn(_rank, args=({tiny_bert!r}, {free_port()}, {str(out)!r}), nprocs=2, join=True)\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, {int(g): m for g, m in json.loads((out / "metrics.json").read_text()).items()}


def test_each_generation_stores_the_fisher_of_the_weights_its_student_moves(trained):
    import torch
    from safetensors.torch import load_file

    from incr_ray.generation.fisher import read_fisher

    out, metrics = trained
    for g in (0, 1):
        fisher, anchors, meta = read_fisher(str(out / f"gen{g}-rank0" / "fisher.safetensors"))
        assert meta == {"generation": g, "rows": 16, "estimator": "expected"}
        assert sorted(fisher) == sorted(["classifier.bias", "classifier.weight"] + [
            f"bert.encoder.layer.{i}.attention.self.{p}.weight" for i in (0, 1) for p in ("query", "value")])
        saved = load_file(str(out / f"gen{g}-rank0" / "model" / "model.safetensors"))  # the merged model
        assert all(torch.equal(anchors[n], saved[n].float()) for n in fisher)
        assert metrics[g]["ewc"]["fisher"]["rows"] == 16 and metrics[g]["zero_stage"] == 2
    assert not (out / "gen0-rank1" / "fisher.safetensors").exists()  # rank 0 alone estimates


def test_generation_1_starts_at_its_teacher_and_pays_the_penalty_through_its_adapters(trained):
    _, metrics = trained
    assert "penalty_mean" not in metrics[0]["ewc"]  # no anchor for generation 0
    ewc = metrics[1]["ewc"]
    assert ewc["lambda"] == 100.0 and ewc["weights"] == 6 and ewc["left_out"] == 0
    assert ewc["penalty_first"] == 0.0 < ewc["penalty_mean"] and 0 < ewc["share_last"] < 1
