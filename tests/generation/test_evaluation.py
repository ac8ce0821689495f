"""Holdout evaluation without Ray: the actor-pool scorer's statistics are additive."""

from __future__ import annotations

import numpy as np
import pytest

from incr_ray.generation.evaluation import HoldoutStatsScorer, Share, holdout_metrics, my_rows, regroup
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


def _batches(*sizes: int) -> list[dict[str, np.ndarray]]:
    out, at = [], 0
    for n in sizes:
        out.append({"label": np.arange(at, at + n), "row_id": np.arange(at, at + n) + 100})
        at += n
    return out


def test_regroup_keeps_the_rows_in_order_in_batches_of_the_size_asked():
    got = list(regroup(_batches(7, 5, 0, 1), 4))
    assert [b["label"].tolist() for b in got] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert [b["row_id"].tolist() for b in got][-1] == [112]
    assert list(regroup(_batches(0), 4)) == []


@pytest.mark.parametrize("sizes, world, scorers, batch", [((7, 5, 1), 3, None, 2), ((2,), 4, None, 3),
                                                          ((10, 3), 2, (0,), 4), ((13,), 4, (0, 2, 3), 1)])
def test_the_scoring_ranks_read_each_row_once_batch_rows_per_forward(sizes, world, scorers, batch):
    shares = [Share(r, world, scorers) for r in range(world)]
    got = {s.rank: [b["label"].tolist() for b in my_rows(_batches(*sizes), s, batch)] for s in shares}
    rows = [row for parts in got.values() for part in parts for row in part]
    assert sorted(rows) == list(range(sum(sizes)))
    assert all(len(part) <= batch for parts in got.values() for part in parts)
    for r in range(world):  # a rank that does not score reads nothing
        assert (got[r] == []) == (scorers is not None and r not in scorers) or sum(sizes) < batch * world


_TWO_RANKS = r"""
import json, os, sys
import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp


def work(rank, path, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from incr_ray.config import config_from_dict
    from incr_ray.generation.evaluation import Share, evaluate_student, holdout_metrics
    from incr_ray.modeling import load_for_inference

    cfg = config_from_dict({"model": {"max_length": 16}, "eval": {"batch_size": 3}})
    model, tok = load_for_inference(path, cfg, on_gpu=False)
    batches = [{"text": np.array([f"word {i} apple" for i in range(s, s + n)], dtype=object),
                "label": np.arange(s, s + n) % 3} for s, n in ((0, 7), (7, 5), (12, 1))]
    split = holdout_metrics(model, tok, batches, cfg, share=Share(rank, 2))
    # Everything a worker measures: validation slice, a fitted temperature, holdout predictions.
    from incr_ray.method import calibration

    calibration.MIN_ROWS = 10  # a 12-row slice may fit a temperature here
    calibrating = config_from_dict({"model": {"max_length": 16}, "eval": {"batch_size": 3},
                                    "method": {"validation_fraction": 0.2, "calibrate": True}})
    for b in batches:
        b["row_id"] = np.arange(len(b["label"])) + 100 * int(b["label"][0])
    slices = lambda: {"holdout": batches, "validation": batches[:2], "retention": batches[2:]}
    student = evaluate_student(model, tok, slices(), calibrating, share=Share(rank, 2))
    # Rank 1 holds no model: rank 0 scores every row, rank 1 only joins the collectives.
    alone = evaluate_student(model if rank == 0 else None, tok, slices(), calibrating, share=Share(rank, 2, (0,)),
                             num_classes=3)
    if rank == 0:
        whole = evaluate_student(model, tok, slices(), calibrating)
        for r in (student, whole, alone):
            r["predictions"] = [sorted(zip(*(a.tolist() for a in r["predictions"])))]
        json.dump({"split": split, "whole": holdout_metrics(model, tok, batches, cfg),
                   "student_split": student, "student_whole": whole, "student_alone": alone}, open(out, "w"))
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
    assert split["predictions"] == whole["predictions"] == got["student_alone"]["predictions"]
    assert len(whole["predictions"][0]) == 13
    for k in ("accuracy", "nll", "ece"):
        assert got["student_alone"]["holdout"][k] == pytest.approx(whole["holdout"][k], abs=1e-9), k
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


def test_a_model_that_knows_fewer_classes_counts_the_rows_of_the_others_as_wrong(tiny_bert):
    """`evaluate --all` on data with a label added after a generation: its 3-class head is scored
    on the 4-class label map, its probabilities padded with a zero, so a label-3 row is wrong (at
    NLL −log 1e-12) and the rows it knows score as on its own head."""
    from incr_ray.generation.evaluation import evaluate_slice

    cfg = scoring_config()
    rows = batch(8)
    rows["label"] = np.array([0, 1, 2, 3, 3, 0, 1, 3])
    out = HoldoutStatsScorer(tiny_bert, cfg, on_gpu=False, num_classes=4)(rows)
    stats = {k: out[k][0] for k in STAT_KEYS}
    assert stats["confusion"].shape == (4, 4) and stats["confusion"][3, 3] == 0 and stats["confusion"][:, 3].sum() == 0
    known = rows["label"] < 3
    mine = {k: v[known] for k, v in rows.items()}
    alone = HoldoutStatsScorer(tiny_bert, cfg, on_gpu=False)(mine)
    assert stats["confusion"][:3, :3].tolist() == alone["confusion"][0].tolist()
    assert stats["nll_sum"][0] == pytest.approx(alone["nll_sum"][0][0] + 3 * -np.log(1e-12))
    with pytest.raises(ValueError):  # the old path: labels beyond the head
        HoldoutStatsScorer(tiny_bert, cfg, on_gpu=False)(rows)
    # The in-worker path counts rows and correct predictions per class, as the confusion has them.
    model, tokenizer = load_for_inference(tiny_bert, cfg, on_gpu=False)
    scored = evaluate_slice(model, tokenizer, [mine], cfg)
    confusion = alone["confusion"][0]
    assert scored.counts == {"rows": confusion.sum(axis=1).tolist(), "correct": np.diag(confusion).tolist()}
