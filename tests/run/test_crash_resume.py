"""R2, the crash (see tests/scenarios.py): R1's config through the CLI, SIGKILLed after
generation 0 and resumed by the same command; it must end with R1's weights byte for byte."""

from __future__ import annotations

import hashlib
import json

import pytest

from scenarios import check_tracking

pytestmark = pytest.mark.e2e


def _weights(root, g: int) -> str:
    return hashlib.sha256((root / f"gen_{g:03d}" / "model" / "model.safetensors").read_bytes()).hexdigest()


def test_status_says_running_while_generation_0_trains(crash_run):
    assert crash_run.status_running is not None, "no progress.json appeared while the run trained"
    code, out = crash_run.status_running
    assert code == 0, out[-2000:]
    # Which generation, and whether in a step or between generations, depends on timing.
    assert "run 'crash'" in out and "): running" in out and "of 2" in out, out


def test_a_second_train_on_the_running_run_is_refused_at_once(crash_run):
    code, out = crash_run.second
    assert code == 2, out[-2000:]
    assert "is in use by process" in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1, out  # refused before Ray starts: nothing else printed
    assert crash_run.first_alive_after_second, "the first run must be unaffected"


def test_the_killed_run_had_finished_generation_0(crash_run):
    gens = crash_run.stopped["generations"]
    assert gens[0]["status"] == "finished" and crash_run.stopped["status"] != "finished"


def test_a_resume_with_a_changed_setting_is_refused_and_changes_nothing(crash_run):
    code, out = crash_run.changed
    assert code == 2 and "Traceback" not in out, out[-2000:]
    assert "method.threshold: 0.9 -> 0.8" in out, out
    assert crash_run.manifest_bytes_refused == crash_run.manifest_bytes_killed


def test_the_resume_skips_generation_0_and_finishes(crash_run):
    code, out = crash_run.resumed
    assert code == 0, out[-3000:]
    assert "[gen 0] already finished, skipped" in out
    assert crash_run.manifest["status"] == "finished"
    assert crash_run.model0_mtime_after == crash_run.model0_mtime, "generation 0 must not be retrained"
    assert "final model:" in out
    # Ray's line about restarting scoring actors (ray-project/ray#53727) is a false alarm for Ray
    # Data's pools, spent off the console (incr_ray.generation.teacher._absorb_restart_warning).
    assert "has constructor arguments in the object store" not in out


def test_the_resumed_run_has_the_reference_weights_and_figures(crash_run, reference_run):
    """The base model has no classification head, so each run initialises a new one: two
    processes, a kill and a resume, and run.seed alone makes the weights byte-identical."""
    for g in (0, 1):
        assert _weights(crash_run.root, g) == _weights(reference_run.root, g), g
        assert crash_run.manifest["generations"][g]["metrics"] == reference_run.manifest["generations"][g]["metrics"]
    assert crash_run.manifest["final_generation"] == reference_run.manifest["final_generation"]


def test_the_resume_re_renders_every_card(crash_run):
    m = crash_run.manifest
    final = m["final_generation"]
    card0 = (crash_run.root / "gen_000" / "model" / "README.md").read_text()
    assert f"Run `crash`'s final model is generation {final}." in card0 or final == 0
    assert ("This is the **final model**" in card0) == (final == 0)
    assert "while the run went on" not in card0  # written before the kill, re-rendered at the end


def test_mlflow_keeps_one_parent_across_the_kill(crash_run, reference_run):
    parent = crash_run.manifest["tracking_run_id"]
    assert parent and crash_run.stopped["tracking_run_id"] == parent
    check_tracking(reference_run.work / "runs" / "mlflow.db", crash_run.manifest, "crash")


def test_status_of_the_resumed_run(crash_run):
    code, out = crash_run.status_finished
    m = crash_run.manifest
    assert code == 0 and ": finished" in out and f"(generation {m['final_generation']})" in out, out
    assert json.loads((crash_run.root / "run.json").read_text()) == m
