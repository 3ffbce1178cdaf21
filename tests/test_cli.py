"""Tests of the `evlm` command line: output lines, exit status, no traceback, --debug."""

import fcntl
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from evlm_cli.cli.main import main
from tests.helpers.project import TINY

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = str(ROOT / "specs" / "vqa_50pct.yaml")
TINY_SPEC = str(TINY)
TINY_ITR_SPEC = str(ROOT / "tests" / "specs" / "tiny_itr.yaml")
TWO_PROBLEMS = "name: two_problems\ntask: vqa\nseed: -3\nprune:\n  target_sparsity: 1.5\n"


def invoke(*args):
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def bad_spec(in_tmp_dir):
    path = in_tmp_dir / "bad.yaml"
    path.write_text(TWO_PROBLEMS, encoding="utf-8")
    return path


def test_validate_prints_one_ok_line_per_spec():
    result = invoke("validate", DEFAULT_SPEC, TINY_SPEC, TINY_ITR_SPEC)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"OK {DEFAULT_SPEC} (name: vqa_50pct, task: vqa)",
        f"OK {TINY_SPEC} (name: tiny_vqa, task: vqa)",
        f"OK {TINY_ITR_SPEC} (name: tiny_itr, task: retrieval)",
    ]
    assert result.stderr == ""


def test_validate_reports_each_problem_on_one_line_and_writes_nothing(bad_spec):
    before = sorted(bad_spec.parent.rglob("*"))
    result = invoke("validate", "bad.yaml")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "bad.yaml:3: seed: -3 is less than the minimum 0",
        "bad.yaml:5: prune.target_sparsity: 1.5 is greater than the maximum 0.95",
    ]
    assert sorted(bad_spec.parent.rglob("*")) == before


def test_validate_checks_every_spec_before_failing(bad_spec):
    result = invoke("validate", TINY_SPEC, "bad.yaml", "missing.yaml")
    assert result.exit_code == 2
    assert result.stdout.splitlines() == [f"OK {TINY_SPEC} (name: tiny_vqa, task: vqa)"]
    errors = result.stderr.splitlines()
    assert len(errors) == 3
    assert errors[-1] == "missing.yaml: cannot read the spec: No such file or directory"


@pytest.mark.parametrize("command", ["run", "compile", "diff", "show", "validate", "stage"])
def test_every_command_has_help(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert f"Usage: main {command}" in result.output
    summary = result.output.splitlines()[2].strip()
    assert len(summary) > 20


@pytest.mark.parametrize("command", ["run", "compile", "show"])
def test_unbuilt_commands_validate_their_spec_first(command, bad_spec):
    result = invoke(command, "bad.yaml")
    assert result.exit_code == 2
    assert "bad.yaml:3: seed: -3 is less than the minimum 0" in result.stderr.splitlines()
    assert "not yet implemented" not in result.stderr


@pytest.mark.parametrize("args", [("show", "nosuchrun"), ("diff", "nosuchrun", "other")])
def test_reports_on_a_missing_run_name_it(args, in_tmp_dir):
    result = invoke(*args)
    assert result.exit_code == 2
    assert result.stderr.strip() == "runs/nosuchrun/params.yaml: no such run (compile or run its spec first)"


def test_run_of_a_bad_spec_writes_nothing_not_even_a_dvc_project(in_tmp_dir):
    shutil.copy(ROOT / "tests/specs/bad/above_maximum.yaml", in_tmp_dir / "bad.yaml")
    result = invoke("run", "bad.yaml")
    assert result.exit_code == 2 and "greater than the maximum" in result.stderr
    assert sorted(p.name for p in in_tmp_dir.iterdir()) == ["bad.yaml"]  # nothing written


def test_compile_writes_params_and_stages(in_tmp_dir):
    shutil.copy(TINY, in_tmp_dir / "tiny.yaml")
    result = invoke("compile", "tiny.yaml")
    assert result.exit_code == 0, result.stderr
    assert (in_tmp_dir / "runs/tiny_vqa/params.yaml").is_file()
    dvc = (in_tmp_dir / "dvc.yaml").read_text()
    assert "tiny_vqa-evaluate" in dvc
    assert "shared-prepare_pairs-" in dvc and "shared-teacher_pretrain-" in dvc  # task-agnostic


def evlm_process(*args, cwd):
    executable = Path(sys.executable).parent / "evlm"
    return subprocess.run([str(executable), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.e2e
def test_real_process_exits_2_with_one_line_per_problem_and_no_traceback(bad_spec):
    finished = evlm_process("validate", "bad.yaml", cwd=bad_spec.parent)
    assert finished.returncode == 2
    assert "Traceback" not in finished.stderr
    assert finished.stderr.splitlines() == [
        "bad.yaml:3: seed: -3 is less than the minimum 0",
        "bad.yaml:5: prune.target_sparsity: 1.5 is greater than the maximum 0.95",
    ]


@pytest.mark.e2e
def test_real_process_with_debug_shows_the_traceback(bad_spec):
    finished = evlm_process("--debug", "validate", "bad.yaml", cwd=bad_spec.parent)
    assert finished.returncode == 2
    assert "Traceback (most recent call last)" in finished.stderr
    assert "load_spec" in finished.stderr
    assert finished.stderr.splitlines()[-1] == (
        "bad.yaml:5: prune.target_sparsity: 1.5 is greater than the maximum 0.95"
    )


def test_stage_help_lists_the_kinds_and_an_unknown_kind_is_refused():
    from evlm_cli.pipeline.registry import KINDS

    result = invoke("stage", "--help")
    assert result.exit_code == 0
    lines = result.output.split("\nKinds:\n")[1].splitlines()
    assert len(lines) == len(KINDS)  # one line per kind, in the registry's order
    for line, kind in zip(lines, KINDS.values(), strict=True):
        assert line.startswith(f"  {kind.name}") and line.endswith(kind.doc), line
    result = invoke("stage", "pruning", "--params", "p.yaml")
    assert result.exit_code == 2 and "unknown kind 'pruning'" in result.stderr


def test_a_folder_inside_a_dvc_project_is_refused(in_tmp_dir):
    from evlm_cli.core.errors import EvlmError
    from evlm_cli.pipeline.runner import ensure_dvc_project

    (in_tmp_dir / ".dvc").mkdir()
    (in_tmp_dir / "sub").mkdir()
    assert ensure_dvc_project(in_tmp_dir) is None  # already one
    with pytest.raises(EvlmError, match="inside the DVC project"):
        ensure_dvc_project(in_tmp_dir / "sub")
    assert not (in_tmp_dir / "sub" / ".dvc").exists()


@pytest.mark.e2e
def test_a_second_evlm_waits_for_the_first_and_says_so(in_tmp_dir):
    """While one evlm holds the project (here: this test), `evlm compile` waits with a message
    naming the holder and writes nothing; once it is released, the compile completes."""
    shutil.copy(TINY, in_tmp_dir / "tiny.yaml")
    lock = in_tmp_dir / ".evlm" / "project.lock"
    lock.parent.mkdir()
    err_path = in_tmp_dir / "stderr.txt"
    with open(lock, "w") as held, open(err_path, "w") as err_file:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("evlm (pid 4242)")
        held.flush()
        second = subprocess.Popen([str(Path(sys.executable).parent / "evlm"), "compile",
                                   "tiny.yaml"], cwd=in_tmp_dir, stdout=subprocess.DEVNULL,
                                  stderr=err_file, text=True)
        deadline = time.monotonic() + 60  # it imports torch before it reaches the lock
        while "waiting for" not in err_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "waiting for evlm (pid 4242) to finish in this project" in err_path.read_text()
        time.sleep(1.0)
        assert second.poll() is None  # still waiting, and nothing written
        assert not (in_tmp_dir / "dvc.yaml").exists()
        fcntl.flock(held, fcntl.LOCK_UN)
        assert second.wait(timeout=120) == 0, err_path.read_text()
    assert (in_tmp_dir / "dvc.yaml").is_file()
    assert lock.read_text() == ""  # its holder cleared it on release
