"""End to end, on one spec's finished run: code dependencies, seeds, `evlm show`, and a team
sharing runs through a DVC remote. Its own module (and project) so that it runs beside the
four-task pipeline test rather than after it."""

import json
import re
import shutil
import sys

import pytest
from PIL import Image

from tests.helpers.pipeline import EVLM, REPO, changed_stages, copy_checkout, edit_spec, ran, sh


@pytest.fixture(scope="module")
def one_run(tmp_path_factory):
    """A user's folder that held only the tiny VQA spec, after one `evlm run` of it."""
    folder = tmp_path_factory.mktemp("one_spec") / "work"
    (folder / "specs").mkdir(parents=True)
    shutil.copy(REPO / "tests/specs/tiny_vqa.yaml", folder / "specs/tiny_vqa.yaml")
    sh([*EVLM, "run", "specs/tiny_vqa.yaml"], folder)
    return folder


@pytest.mark.e2e
def test_code_dependencies_are_exact(one_run, tmp_path):
    """Editing a module reruns the stages whose run functions reach it through imports."""
    project = one_run
    # the finished run's student exported by hand (a folder outside the run's outputs)
    out = sh([*EVLM, "export", "tiny_vqa", "--out", "shipped", "--no-int8"], project).stdout
    assert re.search(r"wrote shipped/model\.onnx \(fp32, [\d.]+ MB\)", out)
    assert float(re.search(r"max abs difference ([\d.e+-]+)", out).group(1)) < 1e-4
    assert sorted(p.name for p in (project / "shipped").iterdir()) == ["export.json", "model.onnx"]
    res = sh([*EVLM, "export", "no_such_run", "--out", "x"], project, check=False)
    assert res.returncode == 2 and "no such run" in res.stderr and not (project / "x").exists()

    copy = tmp_path / "package"  # a throwaway copy of evlm, imported instead of the installed one
    shutil.copytree(REPO / "evlm_cli", copy / "evlm_cli", ignore=shutil.ignore_patterns("__pycache__"))
    assert changed_stages(project, copy) == set()

    with open(copy / "evlm_cli/compress/l0.py", "a") as f:  # only pruning imports the L0 gates
        f.write("\n# an edit\n")
    # DVC lists prune alone: finetune and evaluate follow once prune's outputs change
    assert changed_stages(project, copy) == {"prune"}

    with open(copy / "evlm_cli/core/errors.py", "a") as f:  # every stage imports the errors
        f.write("\n# an edit\n")
    assert changed_stages(project, copy) == {"prepare_pairs", "teacher_pretrain", "distill",
                                              "prepare", "teacher", "teacher_eval", "dense",
                                              "prune", "finetune", "export", "evaluate"}
    shown = sh([*EVLM, "show", "tiny_vqa"], project, env_extra={"PYTHONPATH": str(copy)}).stdout
    assert re.search(r"tiny_vqa-prune\s+would rerun: changed deps: \.evlm/code/prune\.json", shown)
    assert changed_stages(project, REPO) == set()  # the installed code again: all up to date


@pytest.mark.e2e
def test_seeds_reuse_the_shared_stages_and_each_prunes_fine_tunes_and_evaluates(one_run):
    project = one_run
    # no export: a faster test
    seeded = edit_spec(project / "specs/tiny_vqa.yaml", name="tiny_seeds", export=None)
    out = sh([*EVLM, "run", str(seeded), "--seeds", "1,2"], project).stdout
    assert sorted(re.findall(r"Running stage '(tiny_seeds-s\d)-prune'", out)) == [
        "tiny_seeds-s1", "tiny_seeds-s2"]
    assert not re.findall(r"Running stage 'shared-", out)
    assert "tiny_seeds: 2 seeds (1, 2)" in out and "distilled student are shared" in out
    diff = sh([*EVLM, "diff", "tiny_seeds", "--format", "json"], project).stdout
    assert json.loads(diff)["tiny_seeds"]["seeds"] == ["tiny_seeds-s1", "tiny_seeds-s2"]


@pytest.mark.e2e
def test_show_gives_settings_stage_status_summary_and_allocation(one_run):
    project = one_run
    shown = sh([*EVLM, "show", "tiny_vqa", "--plot", "show.png"], project).stdout
    assert "wrote show.png" in shown
    with Image.open(project / "show.png") as image:
        image.load()
        assert min(image.size) >= 300
    assert re.search(r"tiny_vqa-prune\s+up to date", shown) and "modal-adaptive to 50%" in shown
    # the longest stage name still stands apart from its status
    assert re.search(r"shared-teacher_pretrain-[0-9a-f]{8}\s+up to date", shown)
    assert "retention" in shown
    assert "allocation:" in shown and re.search(r"vision\s+heads\s+\S+\s+\d+/2", shown)


@pytest.mark.e2e
def test_a_team_shares_runs_through_a_dvc_remote_and_nothing_retrains(one_run):
    project = one_run
    # A team shares runs/ through a DVC remote: push here, pull into a second checkout (what
    # git would carry: everything but DVC's cached outputs); there nothing retrains.
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "remote", "add", "-d", "team", str(project.parent / "remote")], project)
    sh([*dvc, "push"], project)
    second = project.parent / "second"
    copy_checkout(project, second)
    assert not (second / "runs/tiny_vqa/finetune/model").exists()
    sh([*dvc, "pull"], second)
    assert (second / "runs/tiny_vqa/finetune/model/model.safetensors").is_file()
    assert ran(sh([*EVLM, "run", "specs/tiny_vqa.yaml"], second).stdout) == set()
    shared = sh([*EVLM, "diff", "tiny_vqa", "--format", "json"], second).stdout
    assert json.loads(shared)["tiny_vqa"]["metrics"] == json.loads(
        (project / "runs/tiny_vqa/evaluate/metrics.json").read_text())


@pytest.mark.e2e
def test_a_second_machine_restores_every_stage_the_first_finished(one_run, tmp_path):
    """`evlm run --remote`: the checkout that ran the spec pushes what it finished; a second
    checkout of the same spec, sharing the remote, runs nothing and gets every output byte
    for byte, the metrics and logs DVC does not cache included. (docs/results/remote_sweep.md
    splits the default sweep this way; tests/test_remote.py starts two machines at once.)"""
    project, remote = one_run, tmp_path / "sweep_remote"
    dvc = [sys.executable, "-m", "dvc"]
    sh([*dvc, "remote", "add", "sweep", str(remote)], project)
    out = sh([*EVLM, "run", "--remote", "sweep", "specs/tiny_vqa.yaml"], project).stdout
    assert ran(out) == set() and re.search(r"evlm: pushed \d+ finished stage\(s\)", out)
    other = tmp_path / "other"  # another machine: the spec, a DVC project, the remote
    (other / "specs").mkdir(parents=True)
    shutil.copy(REPO / "tests/specs/tiny_vqa.yaml", other / "specs/tiny_vqa.yaml")
    sh([*dvc, "init", "--no-scm", "-q"], other)
    sh([*dvc, "remote", "add", "sweep", str(remote)], other)
    out = sh([*EVLM, "run", "--remote", "sweep", "specs/tiny_vqa.yaml"], other).stdout
    assert ran(out) == set()
    restored = re.findall(r"Stage '([^']+)' is cached - skipping run", out)
    assert len(restored) == len(set(restored)) == 11
    files = [p.relative_to(other) for p in (other / "runs").rglob("*")
             if p.is_file() and p.name != "run.log"]  # run.log: each machine's own output
    assert {f.name for f in files} >= {"metrics.json", "log.csv", "masks.json",
                                       "model.safetensors", "model.onnx"}
    assert [f for f in files if (project / f).read_bytes() != (other / f).read_bytes()] == []
    assert "retention" in out  # the summary, from the restored metrics


def busy_loops(count: int) -> list:
    """`count` processes that do nothing but take a core each."""
    import subprocess

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


@pytest.mark.e2e
def test_evaluate_beside_busy_processes_marks_its_timings_and_bench_retakes_them(one_run,
                                                                                 tmp_path):
    import os

    import yaml

    from evlm_cli.core.results import BenchResults, EvaluateResults

    project = tmp_path / "work"
    shutil.copytree(one_run, project)  # a copy: the module's other tests read the original
    stage = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]["tiny_vqa-evaluate"]
    # two busy loops per core: whatever else runs, evaluate finds its cores taken
    loops = busy_loops(2 * len(os.sched_getaffinity(0)))
    try:
        sh(stage["cmd"].split(), project)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    metrics = project / "runs/tiny_vqa/evaluate/metrics.json"
    timing = EvaluateResults.read(metrics).timing
    assert timing.contended and timing.taken_by == "evaluate"
    assert timing.others_busy_during > 1.0
    shown = sh([*EVLM, "show", "tiny_vqa"], project).stdout
    assert re.search(r"latency batch 1 \(ms\) \*", shown)
    assert "* contended: other processes kept" in shown and "evlm bench tiny_vqa" in shown
    # bench retimes the run and every table shows its figures, with how they were taken
    benched = sh([*EVLM, "bench", "tiny_vqa"], project).stdout
    assert "wrote runs/tiny_vqa/bench.json" in benched
    bench = BenchResults.read(project / "runs/tiny_vqa/bench.json")
    assert bench.timing.taken_by == "bench" and bench.benched_with == ("tiny_vqa",)
    assert set(bench.latency_ms) == set(EvaluateResults.read(metrics).latency_ms)
    shown = sh([*EVLM, "show", "tiny_vqa"], project).stdout
    assert "timed by bench on cpu" in shown
    # evaluate's results rewritten (a rerun): the older bench file is no longer shown
    metrics.write_text(metrics.read_text().replace('"taken_by": "evaluate"',
                                                   '"taken_by": "evaluate" '))
    assert "timed by evaluate on cpu" in sh([*EVLM, "show", "tiny_vqa"], project).stdout
