"""The package's layers, checked from its source: imports point one way, and the method's math
imports none of Ray, DeepSpeed or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "incr_ray"

# Higher layers may import lower ones, never the reverse (a layer may import itself).
LAYERS = {
    "cli": 7,
    "compare": 6,  # runs many runs: above run, below the command line
    "run": 5,
    "resolve": 4,  # every cluster-dependent `auto`, from the rules in generation and plan
    "generation": 3,
    "predict": 3,
    "plan": 3,
    "data": 2,
    "modeling": 2,
    "heads": 2,
    "lora": 2,
    "method": 1,
    "config": 1,
    "rotten_tomatoes": 1,
    "storage": 0,
    "faults": 0,
}


def _layer(module: str) -> str:
    """'incr_ray.run.loop' -> 'run'."""
    return module.split(".")[1]


def _package_imports(path: Path) -> set[str]:
    """Absolute names of the incr_ray modules that ``path`` imports, wherever the import sits."""
    module = "incr_ray." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
                targets = [name] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                targets = [node.module or ""]
            found.update(t for t in targets if t.startswith("incr_ray."))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("incr_ray."))
    return found


def test_every_module_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert tops - {"__init__"} <= set(LAYERS), tops - set(LAYERS)


def test_imports_point_down_the_layers():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE and path.name == "__init__.py":
            continue
        here = _layer("incr_ray." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for target in _package_imports(path):
            there = _layer(target)
            if there != here and LAYERS[there] >= LAYERS[here]:
                upward.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not upward, upward


@pytest.mark.slow  # a fresh interpreter
def test_method_imports_without_ray_deepspeed_or_transformers():
    code = (
        "import sys\n"
        "for name in ('ray', 'deepspeed', 'transformers'):\n"
        "    sys.modules[name] = None  # any import of them now fails\n"
        "import incr_ray.method.targets, incr_ray.method.losses, incr_ray.method.metrics, incr_ray.method.hashing\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


# What runs where Ray is absent (the GPU check, the multi-rank tests): the student recipe and the
# pieces the GPU check takes from the package.
RAY_FREE = ("incr_ray.generation.recipe", "incr_ray.generation.local_group", "incr_ray.generation.teacher",
            "incr_ray.generation.evaluation", "incr_ray.modeling", "incr_ray.rotten_tomatoes", "incr_ray.plan")


@pytest.mark.slow  # imports torch, transformers and peft afresh
def test_the_recipe_imports_without_ray():
    code = (
        "import sys\n"
        "sys.modules['ray'] = None  # any import of it now fails\n"
        f"import {', '.join(RAY_FREE)}\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_relative_imports_are_resolved():
    """The walk resolves relative imports (`from ..x import y`), so an upward one cannot slip through."""
    fake = PACKAGE / "method" / "targets.py"
    imports = _package_imports(fake)
    assert all(_layer(t) == "method" for t in imports)
    loop = _package_imports(PACKAGE / "run" / "loop.py")
    assert "incr_ray.generation.student" in loop and "incr_ray.run.folder" in loop
