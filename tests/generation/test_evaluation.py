"""Holdout evaluation without Ray: the actor-pool scorer's statistics are additive."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.generation.evaluation import HoldoutStatsScorer, holdout_metrics, rank_slice
from incr_ray.generation.teacher import TargetScorer
from incr_ray.method.metrics import STAT_KEYS, batch_stats, finalize, merge_stats
from incr_ray.modeling import load_for_inference
from test_teacher import batch, scoring_config


def test_stats_are_additive(tiny_bert):
    cfg = scoring_config()
    scorer = HoldoutStatsScorer(tiny_bert, cfg, on_gpu=False)
    a, b = batch(6), batch(10)
    outputs = [scorer(x) for x in (a, b)]
    merged = finalize(merge_stats([{k: out[k][0] for k in STAT_KEYS} for out in outputs]))
    # Each batch row also carries its rows' ids and predicted classes (for the flip rate).
    assert outputs[0]["row_ids"][0].tolist() == a["row_id"].tolist()
    assert len(outputs[1]["preds"][0]) == 10
    probs = np.concatenate([
        np.array(TargetScorer(tiny_bert, cfg, False)(x).to_pydict()["teacher_probs"]) for x in (a, b)
    ])
    labels = np.concatenate([a["label"], b["label"]])
    whole = finalize(batch_stats(probs, labels))
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert merged[k] == pytest.approx(whole[k], abs=1e-9)
    assert set(STAT_KEYS) <= set(scorer(a))
    # The in-worker path (a model already in memory) gives the same figures.
    model, tokenizer = load_for_inference(tiny_bert, cfg, on_gpu=False)
    in_memory = holdout_metrics(model, tokenizer, [a, b], cfg)
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert in_memory[k] == pytest.approx(whole[k], abs=1e-9)


def test_rank_slices_cover_each_row_once_with_equal_forwards():
    for n, world in [(10, 3), (2, 4), (7, 1), (0, 2)]:
        slices = [rank_slice(n, r, world) for r in range(world)]
        assert len({len(rows) for rows, _ in slices}) == 1  # the same forwards on every rank
        real = np.concatenate([rows[:k] for rows, k in slices])
        assert sorted(real.tolist()) == list(range(n))


_TWO_RANKS = r"""
import json, os, sys
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank, path, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from incr_ray.config import config_from_dict
    from incr_ray.generation.evaluation import evaluate_student, holdout_metrics
    from incr_ray.modeling import load_for_inference

    cfg = config_from_dict({"model": {"max_length": 16}})
    model, tok = load_for_inference(path, cfg, on_gpu=False)
    batches = [{"text": np.array([f"word {i} apple" for i in range(s, s + n)], dtype=object),
                "label": np.arange(s, s + n) % 3} for s, n in ((0, 7), (7, 5), (12, 1))]
    split = holdout_metrics(model, tok, batches, cfg, rank=rank, world=2)
    # Everything a worker measures: validation slice, a fitted temperature, holdout predictions.
    from incr_ray.method import calibration

    calibration.MIN_ROWS = 10  # a 12-row slice may fit a temperature here
    calibrating = config_from_dict({"model": {"max_length": 16},
                                    "method": {"validation_fraction": 0.2, "calibrate": True}})
    for b in batches:
        b["row_id"] = np.arange(len(b["label"])) + 100 * int(b["label"][0])
    slices = lambda: {"holdout": batches, "validation": batches[:2], "retention": batches[2:]}
    student = evaluate_student(model, tok, slices(), calibrating, rank=rank, world=2)
    if rank == 0:
        whole = evaluate_student(model, tok, slices(), calibrating)
        for r in (student, whole):
            r["predictions"] = [sorted(zip(*(a.tolist() for a in r["predictions"])))]
        json.dump({"split": split, "whole": holdout_metrics(model, tok, batches, cfg),
                   "student_split": student, "student_whole": whole}, open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(work, args=tuple(sys.argv[1:]), nprocs=2)
"""


@pytest.mark.slow  # two processes in a gloo group
def test_two_ranks_give_the_metrics_of_one(tiny_bert, tmp_path):
    """Two gloo ranks each score their slices of uneven batches; the summed statistics give the
    figures of one process scoring every row."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script, out = tmp_path / "two_ranks.py", tmp_path / "out.json"
    script.write_text(_TWO_RANKS)
    proc = subprocess.run([sys.executable, str(script), tiny_bert, port, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["split"]["n"] == got["whole"]["n"] == 13
    for k in ("accuracy", "macro_f1", "nll", "ece"):
        assert got["split"][k] == pytest.approx(got["whole"][k], abs=1e-9), k
    split, whole = got["student_split"], got["student_whole"]
    assert split["predictions"] == whole["predictions"] and len(whole["predictions"][0]) == 13
    assert split["validation"]["rows"] == whole["validation"]["rows"] == 12
    assert split["retention"]["rows"] == 1
    c = whole["calibration"]
    assert split["calibration"]["temperature"] == pytest.approx(c["temperature"], rel=1e-9)
    assert c["temperature"] != 1.0 and whole["holdout"]["nll"] == pytest.approx(c["nll_after"])
    for k in ("accuracy", "nll", "ece"):
        assert split["holdout"][k] == pytest.approx(whole["holdout"][k], abs=1e-9), k


def test_a_small_validation_slice_fits_no_temperature(tiny_bert):
    from incr_ray.config import config_from_dict
    from incr_ray.generation.evaluation import evaluate_student
    from incr_ray.method.calibration import MIN_ROWS

    cfg = config_from_dict({"model": {"max_length": 16}, "method": {"validation_fraction": 0.1, "calibrate": True}})
    model, tokenizer = load_for_inference(tiny_bert, cfg, on_gpu=False)
    small = batch(MIN_ROWS - 1)
    out = evaluate_student(model, tokenizer, {"holdout": [batch(6)], "validation": [small]}, cfg)
    assert out["validation"]["rows"] == MIN_ROWS - 1
    assert out["calibration"]["temperature"] == 1.0
    assert out["calibration"]["ece_before"] == out["calibration"]["ece_after"] == out["holdout"]["ece"]
