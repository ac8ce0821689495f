"""The README and docs/: generated pages are current, links resolve, the README stays short, and
nothing points outside the repository."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import json
from pathlib import Path

import pytest
from pydantic import BaseModel

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(DOCS.glob("*.md"))]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["docs/configuration.md", "docs/benchmarks.md", "README.md"])
def test_generated_page_is_current(page):
    generate = _generator()
    expected = generate.PAGES[page]()
    committed = (REPO / page).read_text(encoding="utf-8")
    assert committed == expected, f"{page} is stale: run `make docs` and commit it"


def test_readme_quality_block_holds_every_paired_difference():
    generate = _generator()
    block = generate.quality_block()
    assert block.startswith(generate.README_BEGIN) and block.endswith(generate.README_END)
    assert "| incremental − full fine-tune |" in block and "| incremental − sequential hard-label |" in block
    if (REPO / "benchmarks" / "results" / "quality_levers.json").is_file():
        assert "| teacher annealing − incremental |" in block
        # The lever with the best mean accuracy difference is named as the recommendation.
        levers = json.loads((REPO / "benchmarks" / "results" / "quality_levers.json").read_text())
        diffs = levers["summary"]["differences"]
        label, best = max(diffs.items(), key=lambda item: item[1]["accuracy"]["mean"])
        change = dict((v[0], v[1]) for v in levers["variants"])[label.split(" − ")[0]]
        assert f"Recommended: `{next(iter(change))}: " in block
        assert f"the best-measured lever ({100 * best['accuracy']['mean']:+.1f} points" in block


def test_readme_quality_block_gives_every_arrival_claim_and_nothing_before_a_run(tmp_path):
    generate = _generator()
    r = json.loads((REPO / "benchmarks" / "results" / "arrival.json").read_text())
    block = generate.quality_block()
    for c in r["claims"]:
        assert f"{c['claim']}: {c['figures'].split(';')[0]}, {c['status']}" in block
    assert f"{len(r['settings']['seeds'])} seeds, k = {r['settings']['k']} arrivals" in block
    assert generate.arrival_sentence(tmp_path) == ""  # no arrival.json: no sentence


def test_readme_cost_line_gives_every_throughput_goal():
    generate = _generator()
    block = generate.cost_block()
    verdicts = json.loads((REPO / "benchmarks" / "results" / "throughput.json").read_text())["verdicts"]
    assert block.startswith(generate.COST_BEGIN) and block.endswith(generate.COST_END)
    for v in verdicts:
        assert f"{v['goal']}: {v['figures']}, {'met' if v['met'] else 'missed'}" in block
    assert block in (REPO / "README.md").read_text(encoding="utf-8")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_readme_demo_table_is_the_recorded_demo_of_the_current_config():
    # README's demo table is rendered from benchmarks/results/demo.json (test_generated_page_is_current
    # checks that); here the record must be a run of jobs/demo.yaml as it is now, so a changed demo
    # config cannot leave an old table behind: re-record it with `make demo-record`.
    from incr_ray.config import config_from_dict, load_config

    generate = _generator()
    r = json.loads((REPO / "benchmarks" / "results" / "demo.json").read_text())
    ran = _flat(config_from_dict(r["config"]).to_dict())  # keys added to the schema since: their defaults
    now = _flat(load_config(REPO / "jobs" / "demo.yaml").to_dict())
    changed = {k: (ran[k], v) for k, v in now.items() if v != "auto" and ran[k] != v}
    assert not changed, f"jobs/demo.yaml differs from the recorded demo {changed}: run `make demo-record`"
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = generate.demo_block()
    assert block.startswith(generate.DEMO_BEGIN) and block.endswith(generate.DEMO_END) and block in readme
    gens = [e for e in r["generations"] if e["status"] == "finished"]
    assert len(gens) == now["method.k"] == len(r["block_sizes"])
    for e in gens:  # each generation's figures, as the console prints them
        m = e["metrics"]
        assert (f"| {e['index']} | {'one-hot' if e['index'] == 0 else 'soft targets'} | {e['rows']} | "
                f"{m['accuracy']:.4f} | {m['macro_f1']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} |") in block
    assert f"{r['wall_seconds'] / 60:.0f} min for the whole command" in block
    assert f"{r['machine']['cpus']}-CPU machine ({r['date']}" in block
    assert r["final_model"] in readme  # the Quick start names the final model the demo gives


def test_every_config_key_is_documented():
    from incr_ray.config import Config

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    sections = [(name, field.annotation) for name, field in Config.model_fields.items()]
    assert ("student", Config.model_fields["student"].annotation) in sections
    while sections:
        section, model = sections.pop()
        assert f"## `{section}`" in text
        for key, sub in model.model_fields.items():
            if isinstance(sub.annotation, type) and issubclass(sub.annotation, BaseModel):
                sections.append((f"{section}.{key}", sub.annotation))  # a nested section, e.g. student.lora
                continue
            assert sub.description, f"{section}.{key} needs Field(description=...) in incr_ray/config.py"
            assert f"| `{key}` |" in text, f"{section}.{key} is missing from docs/configuration.md"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link} (no such file)")
        elif REPO not in target.parents and target != REPO:
            broken.append(f"{link} (outside the repository)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link} (no heading #{anchor} in {target.relative_to(REPO)})")
    assert not broken, f"{page.relative_to(REPO)}: {broken}"


def test_readme_is_short_and_names_the_two_commands():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150, "keep the README short; move detail into docs/"
    assert "make demo" in text and "make test" in text


def test_docs_do_not_turn_token_auth_off():
    disabled = re.compile(r"RAY_AUTH_MODE\W{0,3}disabled", re.IGNORECASE)
    offenders = [str(p.relative_to(REPO)) for p in PAGES if disabled.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"token authentication must stay on: {offenders}"


# Notes kept outside this repository; a page or a comment that names them points nowhere for a
# reader of the repository. Built from parts so that this file does not match itself.
OUTSIDE = ("../" + "shared", "RAY-" + "NOTES", "DESIGN" + ".md")


def _project_files() -> list[Path]:
    roots = ["README.md", "docs", "incr_ray", "tests", "benchmarks", "jobs"]
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", *roots],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / line for line in out.splitlines() if line]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        files = [REPO / "README.md", *(p for r in roots[1:] for p in (REPO / r).rglob("*"))]
    return [f for f in files if f.is_file() and f.suffix in {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ""}]


def test_nothing_points_outside_the_repository():
    offenders = []
    for path in _project_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        offenders += [f"{path.relative_to(REPO)}: {name}" for name in OUTSIDE if name in text]
    assert not offenders, offenders


def test_quality_block_and_per_seed_table_read_a_compare_result(tmp_path):
    """benchmarks/quality.py writes compare.json's content into quality.json: the README block and the
    per-seed table read it under the benchmark's method names."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    import quality

    from incr_ray.compare.plan import plan_compare
    from incr_ray.compare.report import summarize

    raw = {"run": {"name": "quality", "seed": 0}, "storage": {"path": str(tmp_path)}, "method": {"k": 4}}
    plan = plan_compare(raw, [], 3, "full,sequential", [])
    accs = {"config": [0.70, 0.74, 0.72], "full": [0.72, 0.73, 0.74], "sequential": [0.69, 0.71, 0.70]}
    results = {f"{v}-s{s}": {"status": "finished", "cost_seconds": 10.0, "holdout_size": 250, "run_dir": "/nowhere",
                             "metrics": {"accuracy": a, "macro_f1": a, "nll": 0.7, "ece": 0.05}}
               for v, xs in accs.items() for s, a in enumerate(xs)}
    settings = {"seeds": [0, 1, 2], "rows": 1000, "k": 4, "max_length": 32, "lr": 2e-4, "batch_size": 8}
    result = quality.quality_result(summarize(plan, results), settings, 1.0)
    (tmp_path / "quality.json").write_text(json.dumps(result))
    generate = _generator()
    block = generate.quality_block(tmp_path)
    assert "(1000 rows per seed, k = 4, MiniLM, max_length 32, CPU from `incr-ray compare`)" in block
    assert "| incremental − full fine-tune | 3 | −1.0 [" in block
    assert "| incremental − sequential hard-label | 3 | +2.0 [" in block
    table = generate._per_seed(tmp_path)
    assert table.splitlines()[0] == "| seed | incremental | hard-label | full fine-tune |"
    assert table.splitlines()[2] == "| 0 | 0.700 | 0.690 | 0.720 |"
