"""`evlm diff NAME@REV`: a run as committed at a git revision, next to the working tree's."""

import json
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from evlm_cli.cli.main import main
from evlm_cli.core.results import Score
from tests.helpers.runs import fake_run, write_run


def git(*args, cwd="."):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def committed_run(in_tmp_dir):
    """Run `a` committed with lr 1e-4 and accuracy 0.9, then changed to 3e-4 and 0.8."""
    git("init", "-q")
    write_run(in_tmp_dir, fake_run("a", [1, 32], 1e-4))
    git("add", "runs")
    git("commit", "-q", "-m", "run a")
    changed = fake_run("a", [1, 32], 3e-4)
    changed = replace(changed, results=replace(
        changed.results, student=replace(changed.results.student, score=Score(0.8))))
    write_run(in_tmp_dir, changed)
    return in_tmp_dir


def test_diff_against_the_commit_shows_both_versions(committed_run):
    result = CliRunner().invoke(main, ["diff", "a@HEAD", "a", "--format", "json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert list(shown) == ["a@HEAD", "a"]
    assert shown["a@HEAD"]["metrics"]["student"]["score"]["value"] == 0.9
    assert shown["a"]["metrics"]["student"]["score"]["value"] == 0.8
    assert shown["a@HEAD"]["params"]["finetune"]["lr"] == 1e-4
    table = CliRunner().invoke(main, ["diff", "a@HEAD", "a"]).output.splitlines()
    rows = {line.split()[0]: line.split()[1:] for line in table[1:]}
    assert rows["vqa_accuracy"] == ["0.9", "0.8"]
    assert rows["finetune.lr"] == ["0.0001", "0.0003"]


def test_a_revision_that_does_not_exist_is_named(committed_run):
    result = CliRunner().invoke(main, ["diff", "a@HEAD~5", "a"])
    assert result.exit_code == 2
    assert "a@HEAD~5" in result.output and "Traceback" not in result.output


def test_a_run_that_the_revision_lacks_is_named(committed_run):
    result = CliRunner().invoke(main, ["diff", "b@HEAD", "a"])
    assert result.exit_code == 2
    assert "has no run b" in result.output and "runs/b/params.yaml" in result.output


def test_a_revision_that_looks_like_an_option_is_refused(committed_run):
    result = CliRunner().invoke(main, ["diff", "a@--output=x", "a"])
    assert result.exit_code == 2
    assert "expected NAME@REV" in result.output
    assert not Path("x").exists()


def test_outside_a_git_repository_the_error_says_so(in_tmp_dir):
    write_run(in_tmp_dir, fake_run("a", [1], 1e-4))
    result = CliRunner().invoke(main, ["diff", "a@HEAD", "a"])
    assert result.exit_code == 2
    assert "a@HEAD:" in result.output and "git" in result.output.lower()


def test_a_run_committed_in_an_older_results_version_is_refused_in_one_line(committed_run):
    metrics = Path("runs/a/evaluate/metrics.json")
    data = json.loads(metrics.read_text())
    data["schema_version"] = 0
    metrics.write_text(json.dumps(data))
    git("commit", "-q", "-am", "an older evlm's results")
    result = CliRunner().invoke(main, ["diff", "a@HEAD", "a"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "a@HEAD: runs/a/evaluate/metrics.json at HEAD: results with schema_version 0, "
        "expected 4 (written by another evlm version): compare a run evaluated since, or read "
        "HEAD with the evlm that wrote it"]
