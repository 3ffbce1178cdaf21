"""The stage registry: declarations agree with the run functions, the graph and stages/."""

import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from evlm_cli.core.config import Params
from evlm_cli.pipeline.codedeps import closure
from evlm_cli.pipeline.registry import KINDS, UNTRACKED_SECTIONS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=list(KINDS))
def test_run_function_takes_params_and_the_declared_paths(kind):
    module, function = kind.run.split(":")
    run = getattr(importlib.import_module(module), function)
    names = list(inspect.signature(run).parameters)
    assert names == ["params", *kind.arguments]


def test_inputs_name_outputs_of_kinds_declared_before():
    seen: dict[str, set[str]] = {}
    for kind in KINDS.values():
        for ref in kind.inputs.values():
            source, output = ref.split(".")
            assert output in seen.get(source, set()), f"{kind.name} reads {ref}"
            if kind.shared:  # a shared stage cannot hang off one spec's stage
                assert KINDS[source].shared, f"shared {kind.name} reads per-spec {source}"
        for ref in kind.optional_inputs.values():
            source, output = ref.split(".")
            assert output in seen.get(source, set()) and KINDS[source].enabled_by, kind.name
        seen[kind.name] = {o.name for o in kind.outputs}
    fields = {f.name for f in dataclasses.fields(Params)}
    for kind in KINDS.values():
        assert set(kind.sections) <= fields, kind.name
    assert set(UNTRACKED_SECTIONS) <= fields


def test_stages_folder_is_the_index_one_file_per_kind():
    files = {p.stem: p.read_text() for p in (ROOT / "stages").glob("*.py")}
    assert set(files) == set(KINDS)
    for name, text in files.items():
        assert f'run_stage("{name}", sys.argv[1:])' in text and KINDS[name].doc in text
        said = " ".join(text.split())  # the docstring says what the declaration says
        kind = KINDS[name]
        assert f"Reads params: {', '.join(kind.sections)}." in said, name
        for arg, ref in {**kind.inputs, **kind.optional_inputs}.items():
            assert f"{arg} ({ref})" in said, name
        for out in kind.outputs:
            assert f"{out.name} ({out.path}" in said, name
        assert kind.run.replace(":", ".") + "()" in said, name


@pytest.mark.e2e
def test_a_stage_file_runs_like_the_entry_point(tmp_path):
    def both(*args):
        return [subprocess.run(command + list(args), capture_output=True, text=True)
                for command in ([sys.executable, str(ROOT / "stages/prune.py")],
                                [sys.executable, "-m", "evlm_cli", "stage", "prune"])]

    by_file, by_entry = both("--help")
    assert by_file.returncode == by_entry.returncode == 0
    assert by_file.stdout == by_entry.stdout
    assert "--student" in by_file.stdout and "--masks" in by_file.stdout
    params = tmp_path / "params.yaml"
    params.write_text("prune: {colour: red}\n")
    paths = [x for a in KINDS["prune"].arguments for x in (f"--{a}", str(tmp_path / a))]
    by_file, by_entry = both("--params", str(params), *paths)
    assert by_file.returncode == by_entry.returncode == 2
    assert by_file.stderr == by_entry.stderr != ""


@pytest.mark.e2e
def test_bad_params_file_is_one_line_and_exit_2(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("prune: {train: {}, colour: red}\n")
    args = ["--params", str(params)] + [x for a in KINDS["prune"].arguments
                                        for x in (f"--{a}", str(tmp_path / a))]
    res = subprocess.run([sys.executable, "-m", "evlm_cli", "stage", "prune", *args],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: stage prune: {params}: prune: unknown key 'colour'"]


def test_code_closure_follows_imports_and_stays_inside_each_kind():
    prune = closure(["evlm_cli.pipeline.entry", KINDS["prune"].module])
    teacher = closure(["evlm_cli.pipeline.entry", KINDS["teacher"].module])
    assert {"evlm_cli.compress.l0", "evlm_cli.compress.slice", "evlm_cli.training.loop",
            "evlm_cli.models.blocks", "evlm_cli.core.errors"} <= set(prune)
    assert "evlm_cli.compress.l0" not in teacher and "evlm_cli.compress.measure" not in teacher
    assert "evlm_cli.pipeline.registry" not in prune  # declarations: their effect is in dvc.yaml
    assert "evlm_cli.cli.main" not in prune and "evlm_cli.spec.load" not in prune
