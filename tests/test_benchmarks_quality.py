"""benchmarks/quality.py without Ray: compare.json read under the benchmark's names and goals, the
final generation of a gated run, the levers' per-seed tables and the rendering of fake results.
(The statistics it uses are tested in tests/method/test_paired.py, compare's own in tests/compare/.)"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import harness  # noqa: E402
import quality  # noqa: E402
from incr_ray.method.paired import paired_difference  # noqa: E402


# ---------------------------------------------------------------------------------------------
# The final generation


def _manifest(accs, final_generation=None, calibration=None):
    gens = []
    for i, acc in enumerate(accs):
        g = {"index": i, "status": "finished", "rows": 100, "seconds": 10.0 + i, "train": {"steps": 13},
             "metrics": {"accuracy": acc, "macro_f1": acc - 0.1, "nll": 1 - acc, "ece": 0.05}}
        if final_generation is not None:
            g["promoted"] = i <= final_generation
        if calibration is not None:
            g["calibration"] = calibration
        gens.append(g)
    m = {"generations": gens}
    if final_generation is not None:
        m["final_generation"] = final_generation
    return m


def test_method_result_reports_the_kept_generation_of_a_gated_run():
    r = quality.method_result(_manifest([0.6, 0.7, 0.65], final_generation=1))
    assert r["final_generation"] == 1 and r["final"]["accuracy"] == 0.7
    assert r["seconds"] == pytest.approx(33.0)
    assert [g["promoted"] for g in r["generations"]] == [True, True, False]
    assert r["generations"][0]["steps"] == 13
    assert quality.method_result(_manifest([0.6, 0.7, 0.65]))["final"]["accuracy"] == 0.65


# ---------------------------------------------------------------------------------------------
# The default run: compare.json under the benchmark's names


def _trial(acc, nll=0.7, ece=0.05, seconds=40.0):
    return {"status": "finished", "metrics": {"accuracy": acc, "macro_f1": acc - 0.1, "nll": nll, "ece": ece},
            "cost_seconds": seconds, "holdout_size": 375, "run_dir": "/nowhere"}


INC = [0.70, 0.74, 0.72, 0.71, 0.73]
FULL = [0.72, 0.73, 0.74, 0.73, 0.72]
HARD = [0.69, 0.71, 0.70, 0.70, 0.72]


def _compare(against="full,sequential", grid=(), failed=()):
    """What run_compare returns (compare.json) for 5 seeds, from compare's own plan and summary."""
    from incr_ray.compare.plan import plan_compare
    from incr_ray.compare.report import summarize

    raw = {"run": {"name": "quality", "seed": 0}, "storage": {"path": "/runs"}, "method": {"k": 4, "threshold": 0.9}}
    plan = plan_compare(raw, [], 5, against, list(grid))
    results = {f"config-s{s}": _trial(a) for s, a in enumerate(INC)}
    results |= {f"full-s{s}": _trial(a, 0.75, 0.08, seconds=20.0) for s, a in enumerate(FULL)}
    results |= {f"sequential-s{s}": _trial(a, 0.8, 0.10) for s, a in enumerate(HARD)}
    results |= {f"method.floor=0.25-s{s}": _trial(a + 0.01) for s, a in enumerate(INC)}
    results |= {f"teacher.ensemble=2-s{s}": _trial(a - 0.02) for s, a in enumerate(INC)}
    for name in failed:
        results[name] = {"status": "failed", "error": "ModelError: out of memory"}
    return summarize(plan, results)


def test_compare_differences_read_as_incremental_minus_each_baseline():
    summary = quality.summary_from_compare(_compare(grid=["method.floor=0.25", "teacher.ensemble=2"]))
    assert list(summary["methods"]) == ["incremental", "full fine-tune", "sequential hard-label",
                                        "incremental + floor", "ensemble teacher (2)"]
    assert summary["methods"]["incremental"]["accuracy"]["mean"] == pytest.approx(0.72)
    assert summary["methods"]["full fine-tune"]["seconds"]["mean"] == pytest.approx(20.0)
    assert list(summary["differences"]) == ["incremental − full fine-tune", "incremental − sequential hard-label",
                                            "incremental + floor − incremental",
                                            "ensemble teacher (2) − incremental"]
    full = summary["differences"]["incremental − full fine-tune"]
    assert (full["a"], full["b"], full["seeds"]) == ("incremental", "full fine-tune", [0, 1, 2, 3, 4])
    assert full["accuracy"]["diffs"] == pytest.approx([-0.02, 0.01, -0.02, -0.02, 0.01])
    assert full["accuracy"]["mean"] == pytest.approx(-0.008)
    want = paired_difference(INC, FULL)  # the same interval as computing incremental − full directly
    assert (full["accuracy"]["lo"], full["accuracy"]["hi"]) == pytest.approx((want["lo"], want["hi"]))
    assert full["seconds"]["mean"] == pytest.approx(20.0)
    hard = summary["differences"]["incremental − sequential hard-label"]["accuracy"]
    assert hard["diffs"] == pytest.approx([0.01, 0.03, 0.02, 0.01, 0.01]) and hard["noise"] is False
    floor = summary["differences"]["incremental + floor − incremental"]["accuracy"]  # a grid value: not flipped
    assert floor["mean"] == pytest.approx(0.01)
    ensemble = summary["differences"]["ensemble teacher (2) − incremental"]["accuracy"]
    assert ensemble["diffs"] == pytest.approx([-0.02] * 5)


def test_a_failed_trial_leaves_its_seed_out_of_the_pairs():
    summary = quality.summary_from_compare(_compare(failed=["full-s2"]))
    full = summary["differences"]["incremental − full fine-tune"]
    assert full["seeds"] == [0, 1, 3, 4] and full["accuracy"]["n"] == 4


def test_verdicts_come_from_the_intervals():
    v = {x["goal"]: x for x in quality.verdicts(quality.summary_from_compare(_compare()))}
    acc = v["final accuracy within 1 point of full fine-tuning (or better)"]
    assert acc["status"] == "inside the seed noise" and acc["met"] is False  # −0.8 points, interval reaches −2.6
    assert "95% CI over 5 seeds" in acc["figures"]
    assert v["lower ECE than full fine-tuning"]["status"] == "met"  # 0.05 vs 0.08 on every seed
    assert v["lower NLL than sequential hard-label"]["status"] == "met"


def test_verdicts_skip_goals_whose_methods_did_not_run():
    goals = [x["goal"] for x in quality.verdicts(quality.summary_from_compare(_compare(against="full")))]
    assert goals == ["final accuracy within 1 point of full fine-tuning (or better)",
                     "lower ECE than full fine-tuning", "lower NLL than full fine-tuning"]


def test_curves_are_read_from_the_trials_run_folders(tmp_path):
    compare = _compare(against="full")
    for t in compare["trials"]:
        folder = tmp_path / t["name"]
        folder.mkdir()
        accs = [0.6, 0.65, 0.7, t["metrics"]["accuracy"]] if t["variant"] == "config" else [t["metrics"]["accuracy"]]
        (folder / "run.json").write_text(json.dumps(_manifest(accs)))
        t["run_dir"] = str(folder)
    curves = quality.curves_from_runs(compare)
    assert list(curves) == ["incremental"] and len(curves["incremental"]) == 4  # full fine-tune: one generation
    assert curves["incremental"][3]["accuracy"]["mean"] == pytest.approx(0.72)


def _gen(acc, nll=0.7, ece=0.05, g=0, seconds=10.0, **extra):
    return {"generation": g, "rows": 100, "seconds": seconds, "accuracy": acc, "macro_f1": acc - 0.1,
            "nll": nll, "ece": ece, **extra}


def _k_blocks(final_acc, nll=0.7, ece=0.05, **extra):
    gens = [_gen(0.6, 0.9, 0.1, g=g) for g in range(3)] + [_gen(final_acc, nll, ece, g=3, **extra)]
    return {"final": gens[-1], "final_generation": 3, "generations": gens, "seconds": 40.0}


CAL = {"temperature": 1.4, "ece_before": 0.10, "nll_before": 0.70, "ece_after": 0.04, "nll_after": 0.66}


def _lever_per_seed():
    out = {}
    for s, (base, sched, cal) in enumerate([(0.70, 0.72, 0.70), (0.71, 0.74, 0.71), (0.69, 0.71, 0.69)]):
        gated = _k_blocks(0.70)
        gated["generations"] = [dict(g, promoted=g["generation"] != 3) for g in gated["generations"]]
        gated["final_generation"], gated["final"] = 2, gated["generations"][2]
        out[s] = {"incremental": _k_blocks(base), "one LR schedule across generations": _k_blocks(sched),
                  "generation gate (keep best)": gated,
                  "temperature scaling": _k_blocks(cal, ece=0.04, calibration=CAL)}
    return out


LEVERS = [lever for lever in quality.LEVERS if lever[0] != "teacher annealing"]


def test_levers_are_paired_against_incremental():
    summary = quality.summarize_variants(_lever_per_seed(), LEVERS)
    assert list(summary["differences"]) == [f"{label} − incremental" for label, _, _ in LEVERS]
    sched = summary["differences"]["one LR schedule across generations − incremental"]["accuracy"]
    assert sched["diffs"] == pytest.approx([0.02, 0.03, 0.02]) and sched["noise"] is False
    cal = summary["calibration"]["temperature scaling"]
    assert cal["temperature"]["mean"] == pytest.approx(1.4)
    assert cal["ece_after_minus_before"]["mean"] == pytest.approx(-0.06)
    assert summary["gate"]["generation gate (keep best)"] == {"not_promoted": [1, 1, 1], "final_generation": [2, 2, 2],
                                                               "generations": [4, 4, 4]}
    assert list(summary["gate"]) == ["generation gate (keep best)"]
    # Every generation of a newer run says promoted: true; only a gate or a skipped student is reported.
    per_seed = _lever_per_seed()
    for v in per_seed.values():
        sched = v["one LR schedule across generations"]
        sched["generations"] = [dict(g, promoted=True) for g in sched["generations"]]
    assert list(quality.summarize_variants(per_seed, LEVERS)["gate"]) == ["generation gate (keep best)"]
    # The gated run's final model is generation 2 (accuracy 0.6), not its last generation.
    gate = summary["differences"]["generation gate (keep best) − incremental"]["accuracy"]
    assert gate["diffs"] == pytest.approx([-0.10, -0.11, -0.09])


def test_every_lever_config_key_is_named_as_the_issue_asks():
    changes = {k: v for _, ch, _ in quality.LEVERS for k, v in ch.items()}
    assert changes == {"student.schedule": "run", "method.anneal": True, "method.validation_fraction": 0.2,
                       "method.keep_best": True, "method.calibrate": True}
    assert quality._override("method.anneal", True) == "method.anneal=true"
    assert [shares for _, _, shares in quality.LEVERS] == [False, True, False, False]


# ---------------------------------------------------------------------------------------------
# Rendering a fake result


SETTINGS = {"seeds": [0, 1, 2, 3, 4], "rows": 1500, "eval_fraction": 0.25, "k": 4, "epochs": 1.0, "lr": 2e-4,
            "batch_size": 8, "max_length": 32, "holdout_rows": 375, "block_rows": 281}


def test_render_and_plot_a_default_result():
    compare = _compare(failed=["sequential-s4"])
    result = quality.quality_result(compare, SETTINGS, 60.0)
    assert result["runner"] == "incr-ray compare" and result["compare"] is compare
    json.dumps(result)
    text = quality.render(result)
    assert "Run by `incr-ray compare --against full,sequential`" in text
    assert "| incremental − full fine-tune | −0.80 [−" in text
    assert "inside the seed noise" in text
    assert "- INSIDE THE SEED NOISE: final accuracy within 1 point of full fine-tuning (or better)" in text
    assert "- MET: lower ECE than full fine-tuning" in text
    assert "Trials that did not finish: sequential hard-label seed 4 (ModelError: out of memory)" in text
    assert quality.plot(result)[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_and_plot_a_levers_result():
    per_seed = _lever_per_seed()
    result = {"settings": dict(SETTINGS, seeds=[0, 1, 2]), "variants": [list(v) for v in LEVERS],
              "summary": quality.summarize_variants(per_seed, LEVERS)}
    text = quality.render_variants(result)
    assert "| one LR schedule across generations | `student.schedule=run` |" in text
    assert "| temperature scaling | 1.400 ± 0.000 | 0.1000 ± 0.0000 | 0.0400 ± 0.0000 | −0.0600" in text
    assert "generations not promoted per seed [1, 1, 1]; final generation per seed [2, 2, 2] (of 4)" in text
    assert quality.plot(result)[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Presets


def test_presets_fill_what_the_command_line_left_unset(tmp_path):
    a = quality.resolve(quality.parser().parse_args(["--workdir", str(tmp_path)]))
    assert (a.seeds, a.rows, a.max_length, a.k, a.min_steps, a.floor) == ([0, 1, 2, 3, 4], 1500, 32, 4, 0, None)
    assert a.out == harness.RESULTS
    a = quality.resolve(quality.parser().parse_args(["--levers", "--workdir", str(tmp_path)]))
    assert a.seeds == [0, 1, 2]
    a = quality.resolve(quality.parser().parse_args(["--gpu", "--workdir", str(tmp_path), "--max-length", "128"]))
    assert a.rows is None and a.use_gpu is True and a.batch_size == 32 and a.max_length == 128
    a = quality.resolve(quality.parser().parse_args(["--smoke"]))
    shutil.rmtree(a.out.parent)  # the temporary folder --smoke made
    assert (a.seeds, a.rows, a.max_length, a.k) == ([0, 1], 160, 16, 2)
    assert harness.RESULTS not in (a.out, a.out.parent) and "smoke" in str(a.out)


def test_the_compare_config_is_the_incremental_run_named_after_the_workdir(tmp_path):
    from incr_ray.compare.plan import plan_compare

    a = quality.resolve(quality.parser().parse_args(["--seeds", "3", "4", "5", "--rows", "1000", "--floor", "0.2",
                                                     "--ensemble", "2", "--workdir", str(tmp_path / "quality")]))
    raw = quality.compare_config(a)
    plan = plan_compare(raw, [], len(a.seeds), quality.AGAINST, quality.compare_grid(a))
    assert plan.folder == str(tmp_path / "quality") and plan.seeds == [3, 4, 5]
    assert [v.name for v in plan.variants] == ["config", "full", "sequential", "method.floor=0.2",
                                               "teacher.ensemble=2"]
    assert cfg_of(plan, "teacher.ensemble=2-s4").teacher.ensemble == 2
    cfg = {t.name: t.config for t in plan.trials}
    assert (cfg["config-s3"].method.k, cfg["config-s3"].method.threshold, cfg["config-s3"].data.max_rows) == (4, 0.9, 1000)
    assert cfg["full-s4"].method.k == 1 and cfg["sequential-s5"].method.threshold == 1.0
    assert cfg["config-s3"].student.min_steps == 0 and cfg["config-s3"].student.init == "previous"


def cfg_of(plan, name: str):
    return next(t.config for t in plan.trials if t.name == name)


def test_seeds_that_compare_cannot_run_are_refused_before_anything_starts(capsys):
    with pytest.raises(SystemExit):
        quality.main(["--seeds", "0", "2", "--workdir", "/nonexistent/quality"])
    assert "consecutive seeds" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Forking generation 0 (files only, no Ray)


def test_forked_run_json_is_a_valid_manifest_without_the_sources_result(tmp_path):
    from incr_ray.config import config_from_dict
    from incr_ray.run.manifest import DataInfo, GenerationEntry, Manifest, load

    source = tmp_path / "s0-incremental"
    for folder in ("split", "gen_000/model", "gen_001/model"):
        (source / folder).mkdir(parents=True)
    (source / "split" / "part.parquet").write_bytes(b"x")
    (source / "report.md").write_text("the source's result")
    cfg_src = config_from_dict({"run": {"name": "s0-incremental"}, "storage": {"path": str(tmp_path)}})
    gens = [GenerationEntry(index=g, status="finished", rows=10, model=f"gen_00{g}/model", seconds=1.0,
                            metrics={"accuracy": 0.5}) for g in (0, 1)]
    manifest = Manifest(name="s0-incremental", run_dir=str(source), status="finished", created="now",
                        config=cfg_src.to_dict(), label_names=["a", "b"],
                        data=DataInfo(fingerprint="f", block_sizes=[10, 10], holdout_size=5), generations=gens,
                        final_model="gen_001/model", final_generation=1)
    (source / "run.json").write_text(manifest.model_dump_json())

    cfg = config_from_dict({"run": {"name": "s0-hard"}, "storage": {"path": str(tmp_path)},
                            "method": {"threshold": 1.0}})
    quality.fork_generation_0(cfg_src, cfg)
    fork = tmp_path / "s0-hard"
    forked = load(str(fork / "run.json"))  # typed: no key the manifest does not know
    assert forked.name == "s0-hard" and forked.status == "running" and forked.run_dir == str(fork)
    assert [g.index for g in forked.generations] == [0] and forked.final_model is None
    assert forked.config["method"]["threshold"] == 1.0
    assert (fork / "gen_000" / "model").is_dir() and (fork / "split" / "part.parquet").exists()
    assert not (fork / "gen_001").exists() and not (fork / "report.md").exists()
    assert (fork / "forked_from").read_text().strip() == str(source)
    quality.fork_generation_0(cfg_src, cfg)  # a second call leaves the fork alone (--resume)


def test_a_whole_copy_keeps_the_result_and_refuses_an_existing_folder(tmp_path):
    from incr_ray.config import config_from_dict
    from incr_ray.run.folder import fork_run
    from incr_ray.run.manifest import RunError, load

    test_forked_run_json_is_a_valid_manifest_without_the_sources_result(tmp_path)
    source = str(tmp_path / "s0-incremental")
    copy = config_from_dict({"run": {"name": "copy"}, "storage": {"path": str(tmp_path)}})
    fork_run(source, copy)
    whole = load(str(tmp_path / "copy" / "run.json"))
    assert (whole.status, whole.final_generation, len(whole.generations)) == ("finished", 1, 2)
    assert (tmp_path / "copy" / "gen_001" / "model").is_dir() and (tmp_path / "copy" / "report.md").exists()
    with pytest.raises(RunError, match="exists already"):
        fork_run(source, copy)
