"""Which of evlm's modules a stage runs, found from the imports in their source, and their hashes.

The compiler writes one fingerprint file per stage kind (`.evlm/code/<kind>.json`) and makes
it a DVC dependency of that kind's stages: editing a module reruns exactly the stages whose
run function reaches it through imports, wherever evlm is installed. The source is parsed,
not imported, so the command line stays free of torch.
"""

from __future__ import annotations

import ast
import hashlib
import json
from functools import cache
from pathlib import Path

import evlm_cli

PACKAGE = "evlm_cli"
ROOT = Path(evlm_cli.__file__).resolve().parent

# The stage entry every stage runs through: it reads the params and calls the run function.
ENTRY = "evlm_cli.pipeline.entry"
# Declarations, not code a stage runs: what they say about a stage is in dvc.yaml itself.
NOT_CODE = ("evlm_cli.pipeline.registry",)


def module_file(module: str) -> Path | None:
    """The source file of an evlm module or package, or None when there is none."""
    parts = module.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def direct_imports(module: str) -> frozenset[str]:
    """The evlm modules `module` imports anywhere in its source, with their parent packages."""
    path = module_file(module)
    if path is None:
        return frozenset()
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from evlm_cli.models import vlm` imports a submodule, not a name.
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if module_file(f"{node.module}.{a.name}") is not None}
    own = {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}
    # Importing a.b.c runs a/__init__ and a/b/__init__ first.
    parents = {".".join(m.split(".")[:i]) for m in own for i in range(1, m.count(".") + 1)}
    return frozenset(m for m in own | parents if module_file(m) is not None)


def closure(roots: list[str]) -> list[str]:
    """Every evlm module reachable from `roots` through imports, sorted."""
    seen: set[str] = set()
    todo = [r for r in roots]
    while todo:
        module = todo.pop()
        if module in seen or module in NOT_CODE:
            continue
        seen.add(module)
        todo.extend(direct_imports(module) - seen)
    return sorted(m for m in seen if module_file(m) is not None)


def fingerprint(run_module: str) -> dict:
    """{module: sha256 of its source} for the stage entry and the run function's module."""
    modules = closure([ENTRY, run_module])
    return {"modules": {m: hashlib.sha256(module_file(m).read_bytes()).hexdigest()
                        for m in modules}}


def fingerprint_text(run_module: str) -> str:
    return json.dumps(fingerprint(run_module), indent=1, sort_keys=True) + "\n"
