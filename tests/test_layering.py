"""Imports point one way, down the folders: parsed from the package's source, so no arrow goes unseen.

The layers, top to bottom (docs/architecture.md):

    cli                                  the commands (torch-free at import)
    spec  pipeline  report               the spec, the stage graph, the readers of results
    recipe                               one module per stage kind
    training                             the one loop, its processes
    models  compress  data  tasks  deploy   the libraries
    core                                 typed params, results contract, errors, io, layout
"""

import ast
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "evlm_cli"

LIBRARIES = {"models", "compress", "data", "tasks", "deploy"}
# What each folder may import besides itself and `core`. Libraries are listed one by one:
# among them the arrows are few and named. A dotted entry names one module of a folder
# (a torch-free one, where the importer must stay torch-free).
ALLOWED = {
    "core": set(),
    "models": set(),
    "tasks": set(),
    "data": {"tasks"},
    "compress": {"models", "tasks"},
    "deploy": {"models"},
    "training": set(),
    "recipe": {"training"} | LIBRARIES,
    # The stage entry relaunches training kinds under torchrun and runs a recipe by the name
    # the registry gives (importlib, so no arrow to recipe appears here).
    "pipeline": {"training.distributed"},
    "spec": {"data.sources"},
    "report": {"pipeline.registry"},
    # `evlm export` and `evlm bench` run their recipes (imported when the command runs, not at
    # start).
    "cli": {"spec", "pipeline", "report", "recipe.export", "recipe.bench"},
    "__main__": {"cli"},
    "": set(),  # the package's own __init__
}


def folder_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def imports_of(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from evlm_cli.training import distributed` names a module of the folder
            folder_level = node.module.count(".") == 1
            found += [f"{node.module}.{a.name}" for a in node.names] if folder_level \
                else [node.module]
    return [m for m in found if m == "evlm_cli" or m.startswith("evlm_cli.")]


def violations(module: str, source: str) -> list[str]:
    """'module -> target' for each import the rules above do not allow."""
    own = folder_of(module)
    allowed = ALLOWED[own] | {"core", own}
    bad = []
    for target in imports_of(source):
        folder, inner = folder_of(target), ".".join(target.split(".")[1:3])
        if folder == "" and target == "evlm_cli" and own == "pipeline":
            continue  # codedeps finds the package's folder from its __file__
        if folder in allowed or inner in allowed:
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


def test_every_folder_of_the_package_has_a_rule_and_no_module_lies_loose():
    folders = {folder_of(m) for m in package_modules()}
    assert folders == set(ALLOWED)
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]


def test_no_relative_imports():
    """The code fingerprints (pipeline.codedeps) follow absolute imports only."""
    relative = [name for name, source in package_modules().items()
                for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.level]
    assert relative == []


def test_no_import_runs_up_or_sideways():
    bad = [v for name, source in package_modules().items() for v in violations(name, source)]
    assert bad == []


def module_graph() -> dict[str, set[str]]:
    """Module -> the evlm modules it imports at module level (not inside functions)."""
    modules = package_modules()
    graph = {}
    for name, source in modules.items():
        targets = set()
        for node in ast.parse(source).body:
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                subs = {f"{base}.{a.name}" for a in node.names} & modules.keys()
                targets |= subs or {base}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph`, each as the modules on it (depth-first search)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circles():
    assert cycles(module_graph()) == []


def test_the_circle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(("module", "source"), [
    # a library reaching up into the recipe, the spec or the CLI
    ("evlm_cli.models.student", "from evlm_cli.compress.distill import uniform_layer_map"),
    ("evlm_cli.data.prepare", "from evlm_cli.spec.load import load_spec"),
    ("evlm_cli.compress.l0", "import evlm_cli.recipe.prune"),
    # the base reaching up into the training layer (io once asked distributed who writes)
    ("evlm_cli.core.io", "from evlm_cli.training.distributed import is_main"),
    # the torch-free side reaching into torch code, even inside a function
    ("evlm_cli.report.diff", "def f():\n    from evlm_cli.models.config import ENCODERS"),
    ("evlm_cli.spec.rules", "from evlm_cli.data.prepare import prepare"),
    # sideways between the top folders, and the training loop reaching into a library
    ("evlm_cli.spec.load", "from evlm_cli.report.runs import load_runs"),
    ("evlm_cli.training.loop", "from evlm_cli.models.vlm import VLM"),
])
def test_the_checker_sees_arrows_that_break_the_rules(module, source):
    assert violations(module, source) == [f"{module} -> {imports_of(source)[0]}"]


def loaded_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


TORCH_FREE = ["evlm_cli.cli.main", "evlm_cli.spec.load", "evlm_cli.pipeline.compile",
              "evlm_cli.pipeline.registry", "evlm_cli.report.diff", "evlm_cli.report.summary", "evlm_cli.core.config",
              "evlm_cli.core.results"]


@pytest.mark.e2e
@pytest.mark.parametrize("module", TORCH_FREE)
def test_the_command_line_loads_no_torch(module):
    loaded = loaded_after(f"import {module}")
    assert module in loaded
    assert not loaded & {"torch", "transformers", "timm", "safetensors.torch", "matplotlib"}


@pytest.mark.e2e
def test_validate_and_help_start_in_a_fraction_of_the_time_torch_takes_to_import():
    """Measured side by side: a return of heavy imports would make them as slow as torch."""
    spec = Path(__file__).resolve().parents[1] / "specs/vqa_50pct.yaml"

    def wall(argv):
        start = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, capture_output=True)
        return time.perf_counter() - start

    torch_import = min(wall(["-c", "import torch, transformers"]) for _ in range(2))
    for args in (["--help"], ["validate", str(spec)]):
        took = min(wall(["-m", "evlm_cli", *args]) for _ in range(2))
        print(f"evlm {args[0]}: {took:.2f} s; import torch, transformers: {torch_import:.2f} s")
        assert took < torch_import, f"evlm {args[0]} took {took:.2f} s"
