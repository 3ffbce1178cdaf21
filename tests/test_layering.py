"""Imports point one way, down: parsed from the package's source, so no arrow goes unseen."""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "evlm_cli"

# What each part of the package may import, besides itself and the package root. A part is a
# top-level module or subpackage; "data.sources" names one torch-free module of a subpackage.
BASE = {"errors", "io", "layout", "packaged", "config", "fileformat"}
ALLOWED = {
    "": set(),  # the package's own __init__
    "errors": set(),
    "layout": set(),
    "fileformat": set(),
    "io": {"errors", "distributed"},  # outputs are written by rank 0 alone
    "distributed": {"errors"},
    "packaged": {"errors"},
    "config": {"errors", "packaged"},
    "pipeline": set(),
    "codedeps": set(),
    "models": BASE,
    "tasks": BASE,
    "data": BASE | {"tasks"},
    "compress": BASE | {"models", "tasks"},
    "train": BASE | {"distributed"},
    "deploy": BASE | {"models"},
    "recipe": BASE | {"models", "tasks", "data", "compress", "train", "deploy"},
    "stage": BASE | {"pipeline", "distributed"},
    "spec": BASE | {"data.sources"},
    "compile": BASE | {"pipeline", "codedeps"},
    "runner": BASE,
    "diff": BASE | {"pipeline"},
    "plots": BASE | {"diff"},
    # `evlm export` runs the export stage's library function (imported when it runs)
    "cli": BASE | {"spec", "compile", "runner", "diff", "plots", "pipeline", "stage",
                   "recipe.export"},
    "__main__": {"cli"},
}


def part_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def imports_of(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append(node.module)
    return [m for m in found if m == "evlm_cli" or m.startswith("evlm_cli.")]


def violations(module: str, source: str) -> list[str]:
    """'module -> target' for each import the rules above do not allow."""
    own, allowed = part_of(module), ALLOWED[part_of(module)]
    bad = []
    for target in imports_of(source):
        part = part_of(target)
        inner = ".".join(target.split(".")[1:3])
        if part in ("", own) or part in allowed or inner in allowed:
            continue
        bad.append(f"{module} -> {target}")
    return bad


def package_modules() -> dict[str, str]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path.read_text(encoding="utf-8")
    return out


def test_every_part_of_the_package_has_a_rule():
    parts = {part_of(m) for m in package_modules()}
    assert parts == set(ALLOWED)


def test_no_relative_imports():
    """The code fingerprints (evlm_cli.codedeps) follow absolute imports only."""
    relative = [name for name, source in package_modules().items()
                for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def test_no_import_runs_up_or_sideways():
    bad = [v for name, source in package_modules().items() for v in violations(name, source)]
    assert bad == []


@pytest.mark.parametrize(("module", "source"), [
    ("evlm_cli.models.student", "from evlm_cli.compress.distill import uniform_layer_map"),
    ("evlm_cli.data.prepare", "from evlm_cli.spec import local_path"),
    ("evlm_cli.diff", "def f():\n    from evlm_cli.models.config import ENCODERS"),
    ("evlm_cli.compress.l0", "import evlm_cli.spec"),
    ("evlm_cli.spec", "from evlm_cli.data.prepare import prepare"),
])
def test_the_checker_sees_arrows_that_break_the_rules(module, source):
    assert violations(module, source) == [f"{module} -> {imports_of(source)[0]}"]


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module", ["evlm_cli.cli", "evlm_cli.spec", "evlm_cli.compile",
                                    "evlm_cli.diff", "evlm_cli.pipeline", "evlm_cli.config"])
def test_the_command_line_loads_no_torch(module):
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & {"torch", "transformers", "timm", "safetensors.torch", "matplotlib"}


def test_validate_and_help_start_fast():
    """Prints the wall times; the assert only catches a return of heavy imports (seconds)."""
    spec = Path(__file__).resolve().parents[1] / "specs/vqa_50pct.yaml"
    for args in (["--help"], ["validate", str(spec)]):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "evlm_cli", *args], check=True, capture_output=True)
        print(f"evlm {' '.join(args[:1])}: {time.perf_counter() - start:.2f} s")
