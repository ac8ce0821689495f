"""Runs that survive: a dying training worker, a dying teacher actor, a killed driver."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from incr_ray import faults
from small_run import small_config

pytestmark = pytest.mark.e2e


def test_worker_death_resumes_from_in_generation_checkpoint(ray_with_faults, tmp_path, tiny_bert):
    from incr_ray.faults import StopRequested
    from incr_ray.run.loop import run_generations

    ray_with_faults(worker_exit_at_step=3, stop_after_generation=0)
    cfg = small_config(
        tmp_path, tiny_bert, "worker-death",
        data={"synthetic_rows": 600},
        method={"k": 2},
        cluster={"workers": 2},
        student={"checkpoint_every_steps": 2, "max_failures": 1, "epochs": 1},
    )
    with pytest.raises(StopRequested):
        run_generations(cfg, say=lambda s: None)
    state = json.loads((Path(cfg.run_dir) / "run.json").read_text())
    gens = state["generations"]
    assert len(gens) == 1 and gens[0]["status"] == "finished"  # one generation, not two
    train = gens[0]["train"]
    # Rank 1 died after step 3; the restarted group continued from the step-2 checkpoint.
    assert train["resumed_from_step"] == 2, train
    assert train["steps"] == train["max_steps"]
    assert faults.fired("worker")


def test_teacher_actor_death_scores_each_row_once(ray_with_faults, tmp_path, tiny_bert):
    import ray

    from incr_ray.generation.teacher import score_block

    ray_with_faults(teacher_exit_at_batch=3)
    cfg = small_config(tmp_path, tiny_bert, "teacher-death", teacher={"batch_size": 50})
    rows = [{"row_id": i, "text": f"word {i} apple", "label": i % 3, "block": 1} for i in range(400)]
    out = score_block(ray.data.from_items(rows), tiny_bert, cfg, on_gpu=False)
    out.write_parquet(str(tmp_path / "targets"))
    assert faults.fired("teacher"), "the fault should have killed one actor"
    import pyarrow.parquet as pq

    got = pq.read_table(tmp_path / "targets").to_pandas()
    assert collections.Counter(got.row_id) == collections.Counter(range(400))
    assert np.allclose(np.stack(got.target.to_numpy()).sum(axis=1), 1.0)


def _cli(config_path: str, **kw):
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "incr_ray.cli", "train", "--config", config_path],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        start_new_session=True, **kw,
    )


def _weights(run_dir: Path, g: int) -> str:
    return hashlib.sha256((run_dir / f"gen_{g:03d}" / "model" / "model.safetensors").read_bytes()).hexdigest()


def test_killed_driver_resumes_and_matches_an_uninterrupted_run(ray_local, tmp_path, tiny_bert_base, monkeypatch):
    """SIGKILL the whole `incr-ray train` process group after generation 0; the same command
    resumes, keeps generation 0, and ends with the same model as a run that was never stopped.
    While the first process runs, a second one on the same run folder is refused.

    The base model has no classification head, so every run initialises a new one: the
    uninterrupted run and the killed-then-resumed one train each generation afresh in different
    processes, and run.seed alone must make their weights byte-identical; another seed must not."""
    from incr_ray.run.loop import run_generations

    cfg = small_config(tmp_path, tiny_bert_base, "driver-kill", data={"synthetic_rows": 900},
                       method={"k": 2}, student={"epochs": 1})
    reference = run_generations(cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "reference"})}),
                                say=lambda s: None)

    cfg_file = tmp_path / "kill.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.to_dict()))
    manifest = Path(cfg.run_dir) / "run.json"
    proc = _cli(str(cfg_file))
    # The driver prints one summary line per finished generation ("gen 0/1 ..."): wait for it,
    # and give up (the kill ends the output) after 300 s.
    watchdog = threading.Timer(300, lambda: os.killpg(proc.pid, signal.SIGKILL))
    watchdog.start()
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("gen 0/1"):
            break
    else:
        pytest.fail("generation 0 did not finish: " + "".join(seen)[-3000:])
    watchdog.cancel()
    gens = json.loads(manifest.read_text())["generations"]
    assert gens[0]["status"] == "finished"
    # While the first run holds the folder, a second one on it is refused (exit 2, one line).
    second = _cli(str(cfg_file))
    out2, _ = second.communicate(timeout=120)
    assert second.returncode == 2, out2[-2000:]
    assert "is in use by process" in out2 and "Traceback" not in out2
    assert proc.poll() is None, "the first run must be unaffected"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    model0 = Path(cfg.run_dir) / "gen_000" / "model" / "model.safetensors"
    mtime0 = model0.stat().st_mtime_ns

    resumed = _cli(str(cfg_file))
    out, _ = resumed.communicate(timeout=400)
    assert resumed.returncode == 0, out[-3000:]
    assert "[gen 0] already finished, skipped" in out
    final = json.loads(manifest.read_text())
    assert final["status"] == "finished"
    assert model0.stat().st_mtime_ns == mtime0
    for g in (0, 1):
        assert final["generations"][g]["metrics"] == reference["generations"][g]["metrics"], g
        assert _weights(Path(cfg.run_dir), g) == _weights(Path(reference["run_dir"]), g), g

    # Another seed, the same data and settings: other weights from generation 0 on.
    other = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "other-seed", "seed": 2})})
    monkeypatch.setenv(faults.ENV, json.dumps({"stop_after_generation": 0}))
    with pytest.raises(faults.StopRequested):
        run_generations(other, say=lambda s: None)
    assert _weights(Path(other.run_dir), 0) != _weights(Path(reference["run_dir"]), 0)


def test_nan_in_a_teacher_actor_reaches_the_driver_as_one_line(ray_local, tmp_path, tiny_bert):
    """fp16 overflow shows up as NaN logits inside a scoring actor; the driver re-raises it as the
    one-line NonFiniteError (exit 2 in the CLI), not as Ray's task-error wrapper."""
    import ray
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from incr_ray.generation.teacher import score_block
    from incr_ray.modeling import NonFiniteError
    from incr_ray.run.loop import _worker_failures_reported

    broken = tmp_path / "nan-model"
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    with torch.no_grad():
        model.classifier.bias.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(broken)
    cfg = small_config(tmp_path, str(broken), "nan")
    rows = [{"row_id": i, "text": f"word {i}", "label": i % 3, "block": 1} for i in range(20)]
    with pytest.raises(NonFiniteError) as caught:
        with _worker_failures_reported(print):
            score_block(ray.data.from_items(rows), str(broken), cfg, on_gpu=False).materialize()
    assert type(caught.value) is NonFiniteError
    assert "\n" not in str(caught.value) and "deepspeed.precision: bf16" in str(caught.value)


def test_a_failing_worker_shows_its_last_lines(ray_with_faults, tmp_path, tiny_bert):
    """Worker output goes to Ray's log files, not the job's console: a worker that fails adds the
    last lines it printed to its exception, and the driver prints them in full."""
    from incr_ray.run.loop import run_generations

    ray_with_faults(worker_raise_at_step=1)
    cfg = small_config(tmp_path, tiny_bert, "worker-raises", data={"synthetic_rows": 600}, method={"k": 2},
                       student={"epochs": 1})
    said = []
    with pytest.raises(Exception) as caught:
        run_generations(cfg, say=said.append)
    assert "injected failure at step 1" in str(caught.value.worker_failures[0])
    shown = "\n".join(said)
    assert "last lines worker rank 0 printed:" in shown and "fault injected: rank 0 fails at step 1" in shown
