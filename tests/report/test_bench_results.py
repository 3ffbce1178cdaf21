"""`evlm bench`'s file beside a run: read in place of evaluate's timings while it retimed those
very results, ignored once evaluate has rerun, refused in one line when malformed."""

import json
from dataclasses import replace

import pytest

from evlm_cli.core.errors import EvlmError
from evlm_cli.core.results import BenchResults, Latency, Speedup
from evlm_cli.report.runs import evaluate_digest, load_run
from evlm_cli.report.summary import summary_table
from tests.helpers.runs import TIMING, fake_run, with_params, write_run


def bench_for(metrics_text: str) -> BenchResults:
    """The run timed again, alone: everything twice as fast as evaluate found it."""
    return BenchResults(
        evaluate_sha256=evaluate_digest(metrics_text), benched_with=("a", "b"),
        latency_ms={"batch_1": Latency(teacher=1.0, dense_student=0.75, student=0.25)},
        speedup={"batch_1": Speedup(total=4.0, depth=4 / 3, pruning=3.0,
                                    depth_over_flops_ratio=2 / 3, pruning_over_flops_ratio=1.5,
                                    over_flops_ratio=1.0)},
        exported={}, timing=replace(TIMING, taken_by="bench"))


@pytest.fixture
def project(tmp_path):
    run = with_params(fake_run("a"), task="vqa",
                      prune={"mode": "modal-adaptive", "target_sparsity": 0.5})
    run = replace(run, results=replace(run.results, timing=replace(
        TIMING, contended=True, others_busy_during=1.7)))
    write_run(tmp_path, run)
    return tmp_path


def test_a_run_reads_with_bench_timings_while_they_retimed_its_results(project):
    metrics = project / "runs/a/evaluate/metrics.json"
    evaluated = load_run("a", project).results
    assert evaluated.timing.contended and evaluated.latency_ms["batch_1"].student == 1.0
    (project / "runs/a/bench.json").write_text(json.dumps(bench_for(metrics.read_text()).to_json()))
    benched = load_run("a", project).results
    assert benched.latency_ms["batch_1"].student == 0.25
    assert benched.speedup["batch_1"].total == 4.0
    assert benched.timing.taken_by == "bench" and not benched.timing.contended
    # the rest is evaluate's
    assert benched.student == evaluated.student and benched.sparsity == evaluated.sparsity
    table = summary_table(load_run("a", project))
    assert "timed by bench on cpu" in table and "contended" not in table
    # evaluate reran: its results changed, and the bench file no longer applies
    metrics.write_text(metrics.read_text() + " ")
    again = load_run("a", project).results
    assert again.latency_ms["batch_1"].student == 1.0 and again.timing.taken_by == "evaluate"
    assert "* contended: other processes kept" in summary_table(load_run("a", project))


def test_a_malformed_bench_file_is_one_line_naming_it(project):
    (project / "runs/a/bench.json").write_text(json.dumps({"schema_version": 4}))
    with pytest.raises(EvlmError) as error:
        load_run("a", project)
    assert str(error.value).startswith(f"{project}/runs/a/bench.json: field ")
    assert "\n" not in str(error.value)
