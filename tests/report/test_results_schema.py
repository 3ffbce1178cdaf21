"""Every report reads metrics.json through the results contract: a run written by another
version is refused in one line that names the rerun, never half read."""

import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from evlm_cli.cli.main import main
from evlm_cli.report.runs import Run, SeedGroup, load_runs
from tests.helpers.runs import fake_run, with_params, write_metrics, write_run

# What evaluate wrote before the results were typed and versioned (keys read by name).
UNVERSIONED = {"metric": "vqa_accuracy", "value": 0.9, "teacher_value": 0.95, "retention": 0.947,
               "params": 1_000_000, "teacher_params": 3_000_000}


@pytest.fixture
def old_run(in_tmp_dir):
    """Run `new`, current; run `old`, its metrics.json of schema version 0."""
    write_run(in_tmp_dir, fake_run("new"))
    write_run(in_tmp_dir, fake_run("old"))
    data = fake_run("old").results.to_json()
    data["schema_version"] = 0
    write_metrics(in_tmp_dir, "old", data)
    return in_tmp_dir


EXPECTED = ("runs/old/evaluate/metrics.json: results with schema_version 0, expected 4 "
            "(written by another evlm version): rerun `evlm run SPEC` for run old "
            "(the evaluate stage reruns)")


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_diff_refuses_an_older_run_in_one_line_and_exits_2(old_run, fmt):
    result = CliRunner().invoke(main, ["diff", "new", "old", "--format", fmt])
    assert result.exit_code == 2
    assert result.stdout == ""  # no half table
    assert result.stderr.splitlines() == [EXPECTED]


@pytest.mark.e2e
def test_diff_refuses_it_as_a_command_would_in_a_terminal(old_run):
    out = subprocess.run([sys.executable, "-m", "evlm_cli", "diff", "new", "old"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stdout == "" and out.stderr.splitlines() == [EXPECTED]


def test_an_unversioned_file_is_refused_too(in_tmp_dir):
    write_run(in_tmp_dir, fake_run("new"))
    (in_tmp_dir / "runs/older").mkdir()
    (in_tmp_dir / "runs/older/params.yaml").write_text(yaml.safe_dump({"name": "older"}))
    write_metrics(in_tmp_dir, "older", UNVERSIONED)
    result = CliRunner().invoke(main, ["diff", "new", "older"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "runs/older/evaluate/metrics.json: results with no schema_version, expected 4 (written "
        "by another evlm version): rerun `evlm run SPEC` for run older (the evaluate stage "
        "reruns)"]


def test_show_refuses_an_older_run_in_one_line(old_run):
    result = CliRunner().invoke(main, ["show", "old"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [EXPECTED]


def test_runs_and_seed_groups_load_as_typed_objects(in_tmp_dir):
    for seed in (0, 1):
        write_run(in_tmp_dir, with_params(fake_run(f"g-s{seed}"), seed=seed))
    write_run(in_tmp_dir, fake_run("single"))
    group, single = load_runs("g"), load_runs("single")
    assert isinstance(group, SeedGroup) and isinstance(single, Run)
    assert group.seeds == [0, 1] and [run.name for run in group.members] == ["g-s0", "g-s1"]
    assert single.members == (single,) and single.results == fake_run("single").results
