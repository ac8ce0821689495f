"""R3, the faults: one k=2 run on 2 ZeRO-3 workers that survives what a cluster throws at
it, on the session's Ray (the faults travel with each call, see incr_ray.faults).

Generation 0: training rank 1 dies at step 3 and the group resumes from its step-2 checkpoint;
each rank writes the rows each step trained (faults.TrainedRows).
Generation 1: a teacher actor dies mid-block (every row is still scored once), then rank 0 raises
at step 1 on every try, so the run fails and says what the worker printed. The same call without
faults then finishes the run without rescoring the block.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from incr_ray import faults
from small_run import small_config

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def faults_run(tmp_path_factory, tiny_bert):
    from conftest import start_local_ray, timings
    from incr_ray.run.loop import evaluate_run, run_generations

    start_local_ray()
    tmp = tmp_path_factory.mktemp("faults")
    once = tmp / "once"
    once.mkdir()
    trained_rows = tmp / "trained-rows"
    trained_rows.mkdir()
    cfg = small_config(tmp, tiny_bert, "faults", data={"synthetic_rows": 600}, method={"k": 2},
                       cluster={"workers": 2}, deepspeed={"stage": 3},
                       student={"checkpoint_every_steps": 2, "max_failures": 1, "epochs": 1},
                       teacher={"batch_size": 25})
    out = SimpleNamespace(cfg=cfg, root=Path(cfg.run_dir), once=str(once), said=[], resumed_said=[],
                          trained_rows=trained_rows)
    with faults.injected(worker_exit_at=[0, 3], teacher_exit_at_batch=3, worker_raise_at=[1, 1], once_dir=str(once),
                         trained_rows_dir=str(trained_rows)):
        with pytest.raises(Exception) as caught:
            run_generations(cfg, say=out.said.append)
    out.error = caught.value
    out.failed = json.loads((out.root / "run.json").read_text())
    out.manifest = run_generations(cfg, say=out.resumed_said.append)
    timings("R3 faults", out.manifest)
    out.evaluated = evaluate_run(str(out.root), all_generations=True)
    return out


def test_a_dead_rank_resumes_from_the_in_generation_checkpoint(faults_run):
    assert faults.fired("worker", faults_run.once)
    train = faults_run.manifest["generations"][0]["train"]
    # Rank 1 died after step 3; the restarted group continued from the step-2 checkpoint.
    assert train["resumed_from_step"] == 2, train
    assert train["steps"] == train["max_steps"]


def test_a_resumed_generation_trains_each_row_once(faults_run):
    """Each rank reads its own run of the seeded order in fixed batches (incr_ray.generation.shards),
    so the restarted group skipped exactly the batches each rank had trained up to the step-2
    checkpoint: those steps of the first try and the steps after the resume together train each of
    generation 0's rows once (one pass: student.epochs 1), on one rank, but the last rows % 2 of
    the order, which run.json records."""
    from incr_ray.method.hashing import generation_seed, shuffle_keys, validation_mask

    cfg, train = faults_run.cfg, faults_run.manifest["generations"][0]["train"]
    resumed, steps = train["resumed_from_step"], train["max_steps"]
    split = pq.read_table(faults_run.root / "split").to_pandas()
    ids = split.row_id[split.block == 0].to_numpy()
    ids = ids[~validation_mask(ids, cfg.run.seed, cfg.method.validation_fraction)]
    keys = shuffle_keys(ids, generation_seed(cfg.run.seed, 0))
    order = [i for _, i in sorted(zip(keys.tolist(), ids.tolist()))]  # the seeded training order
    assert train["rows"] == len(order) and train["rows_left_out"] == len(order) % 2
    trained = {}
    for rank in (0, 1):
        tries = [[json.loads(line) for line in f.read_text().splitlines()]
                 for f in faults_run.trained_rows.glob(f"g0-r{rank}-*.jsonl")]
        first = next(t for t in tries if t[0]["step"] == 1)
        after = next(t for t in tries if t[0]["step"] == resumed + 1)  # the restarted group's
        kept = [s for s in first if s["step"] <= resumed] + after
        assert [s["step"] for s in kept] == list(range(1, steps + 1)), rank
        trained[rank] = [i for s in kept for i in s["rows"]]
    assert not set(trained[0]) & set(trained[1])
    assert sorted(trained[0] + trained[1]) == sorted(order[:len(order) - train["rows_left_out"]])
    half = len(order) // 2
    assert trained[0] == order[:half] and trained[1] == order[half:2 * half]  # each rank its run, in order


def test_no_worker_folder_of_a_dead_process_is_left(faults_run):
    """Rank 1 died by os._exit, and Ray killed the other ranks of each failed try: none of them ran
    its finally. The workers that came after removed their folders (each holds a model copy)."""
    import os

    from conftest import worker_folders

    def owner(folder):
        try:
            return int((Path(folder) / "pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def mtime(folder):
        try:
            return os.path.getmtime(folder)
        except OSError:  # gone meanwhile (another run on this machine)
            return 0.0

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    # Folders since this run began (written before its first worker started) that name their
    # process; one without a pid is being made right now (another run on this machine).
    since = (faults_run.root / "split").stat().st_mtime
    ours = [f for f in worker_folders() if mtime(f) >= since and owner(f) is not None]
    assert not [f for f in ours if not alive(owner(f))], ours


def test_a_dead_teacher_actor_still_scores_each_row_once(faults_run):
    assert faults.fired("teacher", faults_run.once)
    split = pq.read_table(faults_run.root / "split").to_pandas()
    targets = pq.read_table(faults_run.root / "gen_001" / "targets").to_pandas()
    assert collections.Counter(targets.row_id) == collections.Counter(split.row_id[split.block == 1])
    assert np.allclose(np.stack(targets.target.to_numpy()).sum(axis=1), 1.0)


def test_a_failing_worker_shows_its_last_lines(faults_run):
    """Worker output goes to Ray's log files, not the job's console: a worker that fails adds the
    last lines it printed to its exception, and the driver prints them in full."""
    assert "injected failure at step 1" in str(faults_run.error.worker_failures[0])
    shown = "\n".join(faults_run.said)
    assert "last lines worker rank 0 printed:" in shown and "fault injected: rank 0 fails at step 1" in shown


def test_the_failed_run_kept_generation_0_and_the_scored_block(faults_run):
    gens = faults_run.failed["generations"]
    assert gens[0]["status"] == "finished" and gens[1]["status"] == "running"
    assert gens[1]["targets"] and not gens[1].get("model")


def test_the_same_call_finishes_without_rescoring(faults_run):
    m = faults_run.manifest
    assert m["status"] == "finished" and [g["status"] for g in m["generations"]] == ["finished", "finished"]
    assert "[gen 0] already finished, skipped" in faults_run.resumed_said
    assert not [s for s in faults_run.resumed_said if "teacher" in s and " scores " in s], faults_run.resumed_said
    assert m["generations"][1]["targets"] == faults_run.failed["generations"][1]["targets"]


def test_zero3_saves_consolidated_trained_weights(faults_run, tiny_bert):
    from safetensors.numpy import load_file

    initial = load_file(str(Path(tiny_bert) / "model.safetensors"))
    for g in (0, 1):
        trained = load_file(str(faults_run.root / f"gen_{g:03d}" / "model" / "model.safetensors"))
        emb = "bert.embeddings.word_embeddings.weight"
        assert trained[emb].shape == initial[emb].shape
        changed = [k for k in initial if k in trained and trained[k].shape == initial[k].shape
                   and not np.allclose(trained[k], initial[k])]
        assert len(changed) > len(initial) // 2, "most weights should have moved during training"


def test_the_workers_evaluation_matches_the_saved_model(faults_run):
    """The ZeRO-3 workers evaluated the consolidated model they saved, both ranks sharing the rows;
    the same folder scored by the actor pool (`incr-ray evaluate`) gives the same figures."""
    for g, metrics in faults_run.evaluated:
        assert metrics == pytest.approx(faults_run.manifest["generations"][g]["metrics"], rel=1e-5), g


def test_nan_in_a_teacher_actor_reaches_the_driver_as_one_line(ray_local, tmp_path, tiny_bert):
    """fp16 overflow shows up as NaN logits inside a scoring actor; the driver re-raises it as the
    one-line NonFiniteError (exit 2 in the CLI), not as Ray's task-error wrapper."""
    import ray
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from incr_ray.generation.teacher import score_block
    from incr_ray.modeling import NonFiniteError
    from incr_ray.run.scoring import worker_failures_reported

    broken = tmp_path / "nan-model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(broken)
    from incr_ray.resolve import ClusterFacts, resolve

    cfg = resolve(small_config(tmp_path, str(broken), "nan", teacher={"pool_size": 1}), ClusterFacts(node_cpus=(2.0,)))
    rows = [{"row_id": i, "text": f"word {i}", "label": i % 3, "block": 1} for i in range(20)]
    with pytest.raises(NonFiniteError) as caught:
        with worker_failures_reported(print):
            score_block(ray.data.from_items(rows), str(broken), cfg, on_gpu=False).materialize()
    assert type(caught.value) is NonFiniteError
    assert "\n" not in str(caught.value) and "deepspeed.precision: bf16" in str(caught.value)


def test_the_run_says_what_auto_became(faults_run):
    """small_config leaves the CPUs at auto: 2 workers on the session's 2-CPU Ray get 1 each."""
    assert "cluster.cpus_per_worker auto -> 1 for 2 worker(s) (2 CPUs on 1 node(s))" in faults_run.said, faults_run.said
    assert all(g["train"]["cpus_per_worker"] == 1 for g in faults_run.manifest["generations"])


def test_in_generation_checkpoints_hold_deepspeeds_states_only(faults_run, tiny_bert):
    """Each in-generation save (every 2 steps, none at the last step) wrote DeepSpeed's partitioned
    states and no consolidated model file (no 16-bit gather onto rank 0), was uploaded while training
    went on (the resume above read the step-2 one), and the final model is still consolidated."""
    from safetensors.numpy import load_file

    params = sum(v.size for v in load_file(str(Path(tiny_bert) / "model.safetensors")).values())
    for g in (0, 1):
        train = faults_run.manifest["generations"][g]["train"]
        # Generation 0's last try resumed at step 2; generation 1 ran once (the call without faults).
        after = train["resumed_from_step"]
        assert train["checkpoint_saves"] == len(range(after + 2, train["max_steps"], 2)) > 0, train
        assert train["checkpoint_model_file"] is False, train
        # fp32 ZeRO-3 over 2 ranks: each rank's fp32 weights and Adam moments, 12Ψ/2 bytes, and no
        # 4Ψ model file on top.
        assert 6 * params <= train["checkpoint_rank_bytes"] < 8 * params, (train["checkpoint_rank_bytes"], params)
        assert (faults_run.root / f"gen_{g:03d}" / "model" / "model.safetensors").is_file()
