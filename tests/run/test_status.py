"""`incr-ray status`: the rendering (pure) for running, stale, failed and finished runs, and the
command on run folders, without Ray."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from incr_ray import cli
from incr_ray.run.status import STALE_AFTER_S, read_status, render_status

NOW = datetime(2026, 12, 1, 12, 0, 0, tzinfo=timezone.utc)
METRICS = {"accuracy": 0.8125, "macro_f1": 0.8, "nll": 0.45, "ece": 0.031}


def _manifest(status="running", gens=(("finished", METRICS), ("running", None), ("pending", None)), **more):
    generations = [{"index": i, "status": s, **({"metrics": m} if m else {}),
                    **({"started": (NOW - timedelta(minutes=30)).isoformat()} if s != "pending" else {})}
                   for i, (s, m) in enumerate(gens)]
    return {"version": 1, "name": "demo", "run_dir": "/runs/demo", "status": status, "created": "x",
            "config": {"method": {"k": len(gens)}}, "label_names": ["a", "b"],
            "data": {"fingerprint": "f", "block_sizes": [10] * len(gens), "holdout_size": 5},
            "generations": generations, **more}


def _progress(age_s: float, generation=1):
    return {"generation": generation, "step": 120, "max_steps": 300, "loss": 0.41234, "lr": 1e-5,
            "rows_per_s": 85.25, "tokens_per_s": 2100.0, "eta_generation_s": 190.0, "eta_run_s": 760.0,
            "updated_at": (NOW - timedelta(seconds=age_s)).isoformat(timespec="seconds")}


def test_running_run_shows_step_rates_etas_and_the_last_metrics():
    text = render_status(_manifest(), _progress(12), NOW)
    assert text.splitlines() == [
        "run 'demo' (/runs/demo): running",
        "generation 1 of 3: step 120/300, loss 0.4123, 85.2 rows/s, 2100 tokens/s; ETA generation 3m10s, run 12m40s",
        "progress updated 2026-12-01T11:59:48+00:00 (12s ago)",
        "last finished: generation 0, holdout accuracy 0.8125, macro-F1 0.8000, NLL 0.4500, ECE 0.0310",
    ]


def test_stale_progress_says_the_job_may_have_stopped():
    text = render_status(_manifest(), _progress(STALE_AFTER_S + 60), NOW)
    assert "no progress since 2026-12-01T11:49:00+00:00 (11m00s ago); the job may have stopped" in text
    # No progress.json yet (scoring, start-up): the generation's start is the last sign of life.
    assert "no progress since" in render_status(_manifest(), None, NOW)
    fresh = _manifest()
    fresh["generations"][1]["started"] = (NOW - timedelta(minutes=2)).isoformat()
    assert "no progress since" not in render_status(fresh, None, NOW)
    assert "generation 1 of 3: started" in render_status(fresh, None, NOW)
    # An older generation's progress file is not this generation's.
    assert "step 120/300" not in render_status(_manifest(), _progress(5, generation=0), NOW)


def test_failed_run_shows_its_error():
    text = render_status(_manifest(status="failed", error="generation 1: worker died"), _progress(4000), NOW)
    assert text.splitlines()[0] == "run 'demo' (/runs/demo): failed"
    assert "error: generation 1: worker died" in text
    assert "may have stopped" not in text  # it did stop, and says why


def test_finished_run_shows_the_final_model_and_its_metrics():
    gens = (("finished", {**METRICS, "accuracy": 0.7}), ("finished", {**METRICS, "accuracy": 0.9}))
    text = render_status(_manifest(status="finished", gens=gens, final_model="gen_001/model", final_generation=1),
                         None, NOW)
    assert text.splitlines() == [
        "run 'demo' (/runs/demo): finished",
        "2 generation(s) finished; final model gen_001/model (generation 1): "
        "holdout accuracy 0.9000, macro-F1 0.8000, NLL 0.4500, ECE 0.0310",
    ]


def test_status_command_reads_the_folder(tmp_path, capsys):
    run = tmp_path / "demo"
    (run / "gen_001").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps(_manifest()))
    (run / "gen_001" / "progress.json").write_text(json.dumps(_progress(3)))
    assert "step 120/300" in read_status(str(run), now=NOW)
    assert cli.main(["status", "--run", str(run)]) == 0
    assert "generation 1 of 3: step 120/300" in capsys.readouterr().out

    assert cli.main(["status", "--run", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("incr-ray: error: ") and "not an incr-ray run folder" in err and err.count("\n") == 1
