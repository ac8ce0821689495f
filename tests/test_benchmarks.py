"""The benchmark scripts' own arithmetic: how per-seed results become mean ± std, curves and the
met/missed verdicts, and the fitted growth line. The scripts themselves are run by hand (docs/benchmarks.md); here nothing starts Ray."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import quality  # noqa: E402
import student_gap  # noqa: E402
import throughput  # noqa: E402


def _gen(acc, nll, ece, seconds=10.0, g=0):
    return {"generation": g, "rows": 100, "seconds": seconds, "accuracy": acc, "macro_f1": acc - 0.1,
            "nll": nll, "ece": ece}


def _seed(inc_acc, full_acc, inc_ece=0.05, full_ece=0.08, hard_ece=0.10):
    curve = [_gen(0.6, 0.9, 0.1, g=g) for g in range(3)] + [_gen(inc_acc, 0.7, inc_ece, g=3)]
    hard = curve[:3] + [_gen(0.70, 0.8, hard_ece, g=3)]
    return {
        "incremental": {"final": curve[-1], "generations": curve, "seconds": 40.0},
        "incremental + floor": {"final": curve[-1], "generations": curve, "seconds": 40.0},
        "sequential hard-label": {"final": hard[-1], "generations": hard, "seconds": 40.0},
        "full fine-tune": {"final": _gen(full_acc, 0.75, full_ece), "generations": [_gen(full_acc, 0.75, full_ece)],
                           "seconds": 20.0},
        "block 0 only": {"final": curve[0], "generations": [curve[0]], "seconds": 10.0},
    }


def _summarize(per_seed):
    """The per-seed summary of the levers' loop, over the old default methods (quality_1500rows.json's shape)."""
    return quality.summarize(per_seed, quality.COMPARISONS, order=list(_seed(0.7, 0.7)))


def test_summary_is_mean_and_sample_std_over_seeds():
    summary = _summarize({0: _seed(0.70, 0.72), 1: _seed(0.74, 0.72), 2: _seed(0.72, 0.72)})
    acc = summary["methods"]["incremental"]["accuracy"]
    assert acc["mean"] == pytest.approx(0.72)
    assert acc["std"] == pytest.approx(0.02)  # sample std of 0.70, 0.74, 0.72
    assert len(summary["curves"]["incremental"]) == 4
    assert summary["curves"]["incremental"][3]["accuracy"]["mean"] == pytest.approx(0.72)


def test_verdicts_mark_each_goal_met_or_missed():
    met = {v["goal"]: v["met"] for v in quality.verdicts(_summarize({0: _seed(0.715, 0.72), 1: _seed(0.715, 0.72)}))}
    assert met["final accuracy within 1 point of full fine-tuning (or better)"] is True  # 0.5 points behind
    assert all(met.values())

    behind = _summarize({0: _seed(0.70, 0.72, inc_ece=0.09)})
    met = {v["goal"]: v["met"] for v in quality.verdicts(behind)}
    assert met["final accuracy within 1 point of full fine-tuning (or better)"] is False  # 2 points behind
    assert met["lower ECE than full fine-tuning"] is False  # 0.09 vs 0.08
    assert met["lower ECE than sequential hard-label"] is True  # 0.09 vs 0.10


def test_growth_line_recovers_fixed_cost_and_slope():
    fixed, per_row = throughput.fit_line([250, 500, 1000], [100 + 0.04 * n for n in (250, 500, 1000)])
    assert fixed == pytest.approx(100)
    assert per_row == pytest.approx(0.04)


def test_matmul_peak_is_a_positive_finite_rate():
    flops = throughput.matmul_peak_flops(size=256, seconds=0.2)
    assert math.isfinite(flops) and flops > 1e6


@pytest.mark.parametrize("script", ["quality.py", "throughput.py", "zero_memory.py", "student_gap.py"])
def test_scripts_describe_their_command(script):
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout


def test_driver_profile_is_seconds_per_generation_of_each_step():
    class Stats:  # pstats.Stats' table: (file, line, function) -> (cc, calls, tottime, cumtime, callers)
        stats = {
            ("/x/incr_ray/run/folder.py", 196, "block"): (4, 4, 0.1, 8.0, {}),
            ("/x/incr_ray/generation/student.py", 330, "fit_student"): (4, 4, 0.1, 100.0, {}),
            ("/x/site-packages/ray/data/dataset.py", 7917, "materialize"): (9, 9, 0.1, 6.0, {}),
            ("/x/site-packages/other/dataset.py", 1, "materialize"): (9, 9, 0.1, 50.0, {}),  # another file's
        }

    rows = {r["step"]: r for r in throughput.driver_profile(Stats(), generations=4)}
    assert rows["read the block (split filter)"] == {"step": "read the block (split filter)", "calls": 4,
                                                     "seconds_per_generation": 2.0}
    assert rows["student fit (fit_student)"]["seconds_per_generation"] == 25.0
    assert rows["  Dataset.materialize (order, holdout, slices)"]["seconds_per_generation"] == 1.5
    assert rows["model card"] == {"step": "model card", "calls": 0, "seconds_per_generation": 0.0}


def _throughput_result():
    """A throughput.json of the shape main() writes, with made-up figures."""
    def gen(seconds, train, scoring):
        return {"rows": 100, "seconds": seconds, "fit_seconds": seconds - 5 - scoring, "train_seconds": train,
                "setup_seconds": 2.0, "save_seconds": 0.2, "scoring_seconds": scoring, "eval_seconds": 0.5,
                "ray_start_seconds": 4.0, "ray_stop_seconds": 1.0}

    def e2e(n, wall, scoring=3.0):
        return {"rows": n, "training_rows": n, "wall_seconds": wall, "final_accuracy": 0.7,
                "generations": [gen(20, 10, 0.0)] + [gen(22, 10, scoring)] * 3}

    student = {label: {"train_seconds": 10.0, "call_seconds": 20.0, "setup_seconds": 2.0, "save_seconds": 0.1,
                       "steps": 20, "samples": 640, "samples_per_second": 64.0, "ratio_in_loop": 0.92,
                       "ratio_whole_call": 0.8} for label, *_ in throughput.STUDENT_PATHS}
    student["plain"] = {"train_seconds": 9.0, "call_seconds": 10.0, "samples": 640, "samples_per_second": 70.0}
    student["plain_ray_data"] = {**student["plain"], "ratio_in_loop": 0.97, "ratio_whole_call": 0.95}
    r = {
        "teacher": {"rows": 2000, "half_rows": 1000,
                    "plain": {"seconds": 20.0, "rows_per_s": 100.0, "marginal_rows_per_s": 98.0},
                    "ray_1x2": {"seconds": 22.0, "rows_per_s": 90.0, "marginal_rows_per_s": 100.0,
                                "ratio_whole_call": 0.9, "ratio_marginal": 1.02},
                    "ray_2x1": {"seconds": 23.0, "rows_per_s": 87.0, "marginal_rows_per_s": None,
                                "ratio_whole_call": 0.87, "ratio_marginal": None}},
        "student": {"rows": 640, "collate": 0.09, **student},
        "order": {"sizes": [{"rows": 640, "in_memory": 0.3, "ray_sort": 3.0}]},
        "ray_train_floor": {"fits": [{}, {}], "start_seconds": 11.0, "stop_seconds": 1.0, "student_import_seconds": 4.6},
        "end_to_end": {"sizes": [750, 1500, 3000], "incremental": [e2e(n, 100 + 0.05 * n) for n in (750, 1500, 3000)],
                       "full": [e2e(n, 40 + 0.04 * n) for n in (750, 1500, 3000)],
                       "hard_label": [e2e(750, 130, scoring=0.0)], "ratios": [1.6, 1.5, 1.45],
                       "incremental_fit": {"fixed_seconds": 100.0, "seconds_per_row": 0.05},
                       "full_fit": {"fixed_seconds": 40.0, "seconds_per_row": 0.04}, "ratio_per_row": 1.25,
                       "per_generation": {"seconds": 21.5, "fit_seconds": 14.0, "train_seconds": 10.0,
                                          "setup_seconds": 2.0, "save_seconds": 0.2, "scoring_seconds": 2.2,
                                          "eval_seconds": 0.5, "fit_startup_seconds": 1.3, "fixed_seconds": 11.5,
                                          "ray_start_seconds": 4.0, "ray_stop_seconds": 1.0},
                       "hard_label_ratio": 0.93, "hard_label_saved_per_generation": 2.0,
                       "driver_profile": [{"step": "  training order", "calls": 4, "seconds_per_generation": 0.4}]},
        "flops": {"params": 22_700_000, "tokens_per_row": 30.0, "matmul_peak_flops": 1.6e11,
                  "plain": {"flops": 1.4e11, "fraction_of_peak": 0.87, "non_embedding_fraction_of_peak": 0.4},
                  "ray_1x2": {"flops": 1.2e11, "fraction_of_peak": 0.75, "non_embedding_fraction_of_peak": 0.35}},
    }
    return r


def test_throughput_verdicts_are_the_overhead_goals_and_the_report_renders():
    r = _throughput_result()
    met = {v["goal"]: v["met"] for v in throughput.verdicts(r)}
    assert met["student training ≥ 0.9× plain HF Trainer, in the training loop"] is True  # 0.92
    assert met["student training ≥ 0.75× plain HF Trainer, whole call at 640 rows"] is True  # 0.8
    assert met["end to end k=4 ≤ 1.6× full fine-tune at 3000 rows"] is True  # 1.45
    assert met["end to end k=4 ≤ 1.4× full fine-tune per extra row (slope)"] is True  # 1.25
    assert met["fixed cost per generation ≤ 12 s (outside the training loop)"] is True  # 11.5
    r["end_to_end"]["per_generation"]["fixed_seconds"] = 12.5
    r["student"]["ray_1x2"]["ratio_in_loop"] = 0.85
    met = {v["goal"]: v["met"] for v in throughput.verdicts(r)}
    assert not met["fixed cost per generation ≤ 12 s (outside the training loop)"]
    assert not met["student training ≥ 0.9× plain HF Trainer, in the training loop"]
    r["verdicts"] = throughput.verdicts(r)
    text = throughput.render(r)
    assert "(0.93×), 2.0 s less per generation" in text and "fit() to the worker function 4.0 s" in text and "| ↳ training order | 4 | 0.4 |" in text
    assert "does nothing took 11.0 s from fit() to the function and 1.0 s after it (mean of 2)" in text
    assert "| 640 | 0.30 | 3.00 |" in text and "took 0.09 s, 1.0% of the plain loop" in text and "MISSED: fixed cost per generation ≤ 12 s" in text
    assert throughput.plot(r).startswith(b"\x89PNG")


def test_student_gap_reverses_every_other_round_so_no_path_always_runs_first():
    names = [name for name, _ in student_gap.PATHS]
    assert student_gap.round_order(0) == names and student_gap.round_order(2) == names
    assert student_gap.round_order(1) == names[::-1] and student_gap.round_order(3) == names[::-1]
    positions = {n: sum(student_gap.round_order(i).index(n) for i in range(4)) for n in names}
    assert len(set(positions.values())) == 1  # over 4 rounds every path has the same mean place


def test_student_gap_takes_each_ratio_against_the_same_rounds_plain_fit():
    def fit(rate):
        return {"samples_per_second": rate, "train_seconds": 640 / rate}

    rates = [{"plain": 20.0, "deepspeed": 18.0, "ray_task": 19.0, "ray_task_deepspeed": 17.0, "ray_data": 18.5,
              "fit_student": 14.0},
             {"plain": 10.0, "deepspeed": 9.0, "ray_task": 10.0, "ray_task_deepspeed": 8.0, "ray_data": 9.0,
              "fit_student": 8.0}]  # round 2 on a machine twice as slow
    paths = student_gap.with_ratios([{name: fit(rate) for name, rate in r.items()} for r in rates])
    assert paths["plain"]["ratios"] == [1.0, 1.0]
    assert paths["deepspeed"]["ratios"] == pytest.approx([0.9, 0.9]) and paths["deepspeed"]["ratio"] == pytest.approx(0.9)
    assert paths["fit_student"]["ratio"] == pytest.approx((0.7 + 0.8) / 2)
    assert (paths["fit_student"]["ratio_min"], paths["fit_student"]["ratio_max"]) == pytest.approx((0.7, 0.8))
    r = {"settings": {"rows": 640, "steps": 20, "repeats": 2}, "paths": paths}
    text = student_gap.render(r)
    assert "| + DeepSpeed ZeRO-0 engine, fresh process | 18.0 / 9.0 | 0.90× (0.90–0.90) |" in text
    assert "| the students' fit_student (Ray Train + DeepSpeed + Ray Data) | 14.0 / 8.0 | 0.75× (0.70–0.80) |" in text


def test_teacher_scoring_steady_rate_leaves_the_first_arrival_out():
    import teacher_scoring

    # start-up and the first block before t=10; then 300 rows in 3 s
    assert teacher_scoring.steady_rate([(10.0, 50), (11.0, 100), (13.0, 200)]) == pytest.approx(100.0)
    assert teacher_scoring.steady_rate([(10.0, 50)]) is None
    assert teacher_scoring.steady_rate([]) is None
    calls = []
    rate = teacher_scoring.plain_rate(calls.append, [{"label": [0] * 4}] * 3)
    assert len(calls) == 3 and rate > 0  # the warm-up batch is called, not counted
