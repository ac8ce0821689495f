"""benchmarks/gpu_report.py: each GPU-check section runs in its own process within its own time
limit and the whole budget; the results files are rewritten after each section, and what a killed
section wrote before its limit is kept. The sections here are tiny Python processes."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_report  # noqa: E402


def _section(out: Path, name: str, body: str) -> list[str]:
    """A section process: a SectionFile ``f`` for ``name`` in ``out``, then ``body``."""
    code = textwrap.dedent(f"""
        import json, os, subprocess, sys, time
        sys.path.insert(0, {str(BENCHMARKS)!r})
        from gpu_report import SectionFile
        f = SectionFile({str(out)!r}, {name!r}, 60)
    """) + textwrap.dedent(body)
    return [sys.executable, "-c", code]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(")")[-1].split()[0] == "Z")


def test_sections_run_in_turn_and_the_results_are_rewritten_after_each(tmp_path):
    report = gpu_report.Report(tmp_path, "test", [], budget_s=60)
    first = _section(tmp_path, "first", """
        f["value"] = 1
        sys.exit(f.run(lambda o: o.update(summary={"a figure": 2.5})))
    """)
    # The second section reads the results file: the first is already there, finished.
    second = _section(tmp_path, "second", f"""
        seen = json.load(open({str(tmp_path / "gpu_check.json")!r}))["sections"]
        f["first_status_seen"] = seen["first"]["status"]
        f["second_status_seen"] = seen["second"]["status"]
        sys.exit(f.run(lambda o: None))
    """)
    gpu_report.run_sections(report, [("first", first, 20), ("second", second, 20)])
    data = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert data["first"]["status"] == "ok" and data["first"]["value"] == 1 and data["first"]["limit_s"] == 20
    assert data["second"]["first_status_seen"] == "ok" and data["second"]["second_status_seen"] == "running"
    assert data["second"]["seconds"] >= 0
    md = (tmp_path / "gpu_check.md").read_text()
    assert "| first | a figure | 2.5 |" in md and "| second | status | ok" in md


def test_a_section_past_its_limit_is_killed_with_its_children_and_keeps_what_it_wrote(tmp_path):
    report = gpu_report.Report(tmp_path, "test", [], budget_s=60)
    hung = _section(tmp_path, "hung", f"""
        child = subprocess.Popen(["sleep", "60"])  # as a Ray or an incr-ray train it started
        open({str(tmp_path / "child.pid")!r}, "w").write(str(child.pid))
        f["measured_before_the_hang"] = 42.0
        f.write()
        time.sleep(60)
    """)
    started = time.monotonic()
    gpu_report.run_sections(report, [("hung", hung, 1.5)])
    took = time.monotonic() - started
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["hung"]
    assert sec["status"].startswith("timeout") and sec["measured_before_the_hang"] == 42.0
    assert 1.4 < took < 4.5, took
    assert not _alive(int((tmp_path / "child.pid").read_text()))


def test_a_crashed_section_is_an_error_with_its_log_tail(tmp_path):
    report = gpu_report.Report(tmp_path, "test", [], budget_s=60)
    crash = _section(tmp_path, "crash", """
        print("the last words of the section", flush=True)
        os._exit(3)
    """)
    gpu_report.run_sections(report, [("crash", crash, 20)])
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["crash"]
    assert sec["status"] == "error" and sec["error"] == "exit code 3"
    assert "the last words of the section" in sec["log_tail"]
    assert (tmp_path / "logs" / "crash.log").is_file()


def test_an_exception_in_a_section_is_recorded_with_its_traceback(tmp_path):
    report = gpu_report.Report(tmp_path, "test", [], budget_s=60)
    raising = _section(tmp_path, "raising", """
        def body(o):
            o["partial"] = True
            raise RuntimeError("no CUDA device")
        sys.exit(f.run(body))
    """)
    gpu_report.run_sections(report, [("raising", raising, 20)])
    sec = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]["raising"]
    assert sec["status"] == "error" and sec["error"] == "RuntimeError: no CUDA device"
    assert sec["partial"] is True and "Traceback" in sec["traceback"]


def test_the_budget_caps_a_section_limit_and_skips_what_no_longer_fits(tmp_path):
    report = gpu_report.Report(tmp_path, "test", [], budget_s=1.5)
    slow = _section(tmp_path, "slow", "time.sleep(60)\n")
    never = _section(tmp_path, "never", "sys.exit(f.run(lambda o: None))\n")
    gpu_report.run_sections(report, [("slow", slow, 30), ("never", never, 30)], min_s=1.0)
    data = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert data["slow"]["status"].startswith("timeout") and data["slow"]["limit_s"] <= 1.5
    assert data["never"]["status"].startswith("skipped")
    assert not (tmp_path / "sections" / "never.json").exists()
