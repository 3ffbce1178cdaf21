"""End to end: `evlm run` on a tiny spec in a folder outside the repository that holds only the spec."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from evlm_cli.core.results import EvaluateResults
from evlm_cli.spec.load import load_schema

REPO = Path(__file__).resolve().parents[1]
EVLM = [sys.executable, "-m", "evlm_cli"]
# One tiny spec per task; they agree on the task-agnostic sections.
TINY_SPECS = ("tiny_vqa", "tiny_itr", "tiny_nlvr2", "tiny_caption")


def sh(cmd, cwd, check=True, env_extra=None, **kw):
    env = dict(os.environ, DVC_NO_ANALYTICS="1", **(env_extra or {}))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode:
        raise AssertionError(f"{cmd} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def ran(output: str) -> set[str]:
    """The kinds of stage that ran ('prune', 'teacher', ...), from DVC's output."""
    names = re.findall(r"Running stage '([^']+)'", output)
    return {n.split("-")[1] if n.startswith("shared-") else n.rsplit("-", 1)[1] for n in names}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A user's folder that held only the four tiny specs, after one `evlm run` of all four
    (evlm made it a DVC project), and that run's output. The tests below share it: each
    `evlm stage` is a fresh interpreter that imports torch, so runs are the suite's cost."""
    folder = tmp_path_factory.mktemp("pipeline") / "work"
    (folder / "specs").mkdir(parents=True)
    for name in TINY_SPECS:
        shutil.copy(REPO / f"tests/specs/{name}.yaml", folder / f"specs/{name}.yaml")
    first = sh([*EVLM, "run", *(f"specs/{name}.yaml" for name in TINY_SPECS)], folder)
    return folder, first.stdout


def edit_spec(path: Path, name: str | None = None, **changes) -> Path:
    spec = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = spec
        *keys, last = dotted.split(".")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value
    if name:
        spec["name"] = name
        path = path.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def results_of(project: Path, name: str) -> EvaluateResults:
    return EvaluateResults.read(project / f"runs/{name}/evaluate/metrics.json")


def accuracy_by_hand(project: Path, name: str, kind: str = "finetune") -> float:
    """The share of run `name`'s test examples whose predicted answer (the argmax of the task
    logits of the model stage `kind` wrote) is the labelled one, counted here: the reference
    for the run's accuracy (easy-VQA questions and statements have one answer each)."""
    import torch

    from evlm_cli.data.loader import open_prepared
    from evlm_cli.models.checkpoint import load_model
    from evlm_cli.models.vlm import TaskLogits
    from evlm_cli.pipeline.compile import plan
    from evlm_cli.training.loop import trim_text

    params = yaml.safe_load((project / f"runs/{name}/params.yaml").read_text())
    stages = {s.kind.name: s for s in plan(params)}
    model = TaskLogits(load_model(project / stages[kind].outputs["model"]).eval(), params["task"])
    test = open_prepared(project / stages["prepare"].outputs["data"]).split("test")
    right = total = 0
    with torch.inference_mode():
        for batch in test.batches(params["evaluate"]["batch_size"]):  # as evaluate batches
            batch = trim_text(batch)
            targets = batch["targets"]
            assert torch.equal(targets.sum(1), torch.ones(len(targets)))  # one answer each
            logits = model(batch["images"], batch["input_ids"], batch["attention_mask"])
            right += int((logits.argmax(1) == targets.argmax(1)).sum())
            total += len(targets)
    assert total == len(test) > 0
    return right / total


@pytest.mark.e2e
def test_run_rerun_partial_reruns_and_sharing(finished):
    project, first = finished
    spec_sections = set(load_schema()["properties"])
    spec = project / "specs/tiny_vqa.yaml"
    assert "made" in first and "a DVC project (without git)" in first
    assert ran(first) == {"prepare_pairs", "teacher_pretrain", "distill", "prepare",
                          "teacher", "teacher_eval", "dense", "prune", "finetune", "export",
                          "evaluate"}
    # The four tasks share the task-agnostic stages: each is in dvc.yaml, and ran, once.
    names = re.findall(r"Running stage '([^']+)'", first)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for kind in ("prepare_pairs", "teacher_pretrain", "distill"):
        assert sum(n.startswith(f"shared-{kind}-") for n in stages) == 1, kind
        assert sum(n.startswith(f"shared-{kind}-") for n in names) == 1, kind
    for kind in ("prepare", "teacher", "teacher_eval"):  # the task's own, one per task
        assert sum(n.startswith(f"shared-{kind}-") for n in stages) == 4, kind
    nlvr2 = results_of(project, "tiny_nlvr2")
    assert nlvr2.metric == "nlvr2_accuracy"
    assert nlvr2.student.score.value == pytest.approx(accuracy_by_hand(project, "tiny_nlvr2"),
                                                      abs=1e-12)
    assert nlvr2.student.size.params < nlvr2.teacher.size.params
    captions = results_of(project, "tiny_caption")
    caption_keys = {"bleu_4", "meteor", "rouge_l", "cider"}
    assert caption_keys <= set(captions.student.score.caption)
    assert caption_keys <= set(captions.teacher.score.caption)
    assert captions.student.score.value == captions.student.score.caption["cider"]
    # a captioner's cost is a whole caption: both models timed writing one, interleaved
    caption_b1 = captions.generation["batch_1"]
    assert caption_b1.teacher_ms > 0 and caption_b1.student_ms > 0
    assert caption_b1.speedup == pytest.approx(caption_b1.teacher_ms / caption_b1.student_ms)
    assert "caption batch 1 (ms)" in first
    assert "CIDEr" in first and "METEOR" in first  # the summary shows all four
    retrieval = results_of(project, "tiny_itr").student.score
    assert set(retrieval.recall) >= {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"}
    assert retrieval.value == retrieval.recall["r_mean"]
    assert "retention" in first and "speedup" in first  # the summary table
    assert "student, ONNX Runtime" in first
    metrics = results_of(project, "tiny_vqa")
    # the exported files, measured as their own rows: fp32 scores what PyTorch does
    assert set(metrics.exported) == {"onnx_fp32", "onnx_int8"}
    assert abs(metrics.exported["onnx_fp32"].value - metrics.student.score.value) < 1e-9
    # every model timed at every batch size, the exported ones too
    assert all(None not in vars(ms).values() for ms in metrics.latency_ms.values())
    # the exported student's speedup is over the teacher exported the same way
    for bs, ms in metrics.latency_ms.items():
        fp32 = metrics.exported["onnx_fp32"]
        assert fp32.speedup[bs] == pytest.approx(ms.teacher_onnx_fp32 / ms.onnx_fp32)
        assert fp32.over_flops_ratio[bs] == pytest.approx(
            fp32.speedup[bs] * metrics.student.size.gflops_per_example
            / metrics.teacher.size.gflops_per_example)
    assert "teacher fp32" in first and "of the FLOPs ratio at batch 1" in first
    # the dense distilled student, timed alongside: depth x pruning is the whole speedup
    # ... and scored: the dense stage trained it on the task (tiny_vqa alone asks for it)
    assert metrics.dense.value == pytest.approx(accuracy_by_hand(project, "tiny_vqa", "dense"),
                                                abs=1e-12)
    assert metrics.dense.retention == pytest.approx(metrics.dense.value
                                                    / metrics.teacher.score.value)
    assert re.search(r"vqa_accuracy\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+retention [\d.]+% "
                     r"\(dense [\d.]+%\)", first)
    assert nlvr2.dense.value is None  # dense: null there: timed, not scored
    split = metrics.speedup["batch_1"]
    assert split.depth * split.pruning == pytest.approx(split.total)
    assert metrics.student.size.params < metrics.dense.size.params < metrics.teacher.size.params
    assert metrics.student.score.value == pytest.approx(accuracy_by_hand(project, "tiny_vqa"),
                                                        abs=1e-12)
    masks = json.loads((project / "runs/tiny_vqa/prune/masks.json").read_text())
    assert masks["params_after"] == metrics.student.size.params < masks["params_before"]

    again = sh([*EVLM, "run", str(spec)], project)
    assert ran(again.stdout) == set()

    edit_spec(spec, **{"finetune.train.lr": 0.0003})
    # the dense baseline trains as finetune trains, so it follows finetune's settings too
    assert ran(sh([*EVLM, "run", str(spec)], project).stdout) == {"dense", "finetune", "export",
                                                                  "evaluate"}

    # a second target: a new run that shares every stage before pruning
    other = edit_spec(spec, name="tiny_sweep", **{"prune.target_sparsity": 0.6})
    assert ran(sh([*EVLM, "run", str(other)], project).stdout) == {"prune", "finetune", "export",
                                                                   "evaluate"}

    # Each target is met to within 0.005 of the prunable parameters, in the sliced model.
    for name, target in (("tiny_vqa", 0.5), ("tiny_sweep", 0.6)):
        assert abs(results_of(project, name).sparsity.overall - target) <= 0.005, name

    # DVC's own views work on what evlm compiled
    assert "tiny_sweep-evaluate" in sh([sys.executable, "-m", "dvc", "dag"], project).stdout
    shown = sh([sys.executable, "-m", "dvc", "metrics", "show"], project).stdout
    assert "runs/tiny_vqa/evaluate/metrics.json" in shown
    assert ran(sh([sys.executable, "-m", "dvc", "repro"], project).stdout) == set()
    plots = json.loads(sh([sys.executable, "-m", "dvc", "plots", "show", "--json"],
                          project).stdout)
    assert {"tiny_vqa: training loss", "tiny_sweep: expected vs target sparsity"} <= set(
        plots["data"]) and not plots.get("errors")

    diff = sh([*EVLM, "diff", "tiny_vqa", "tiny_sweep", "--plot", "diff.png"], project).stdout
    assert re.search(r"prune\.target_sparsity\s+0\.5\s+0\.6", diff)
    # the two runs differ in one param, and every figure shown is its metrics.json value
    table = sh([*EVLM, "diff", "tiny_vqa", "tiny_sweep", "--format", "markdown"],
               project).stdout.splitlines()
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    params = {label for label in rows if "." in label and label.split(".")[0] in spec_sections}
    assert params == {"prune.target_sparsity"}
    for column, name in enumerate(("tiny_vqa", "tiny_sweep")):
        m = results_of(project, name)
        assert rows["vqa_accuracy"][column] == f"{m.student.score.value:.4g}"
        assert rows["sparsity overall"][column] == f"{m.sparsity.overall:.4g}"
        assert rows["speedup batch 1"][column] == f"{m.speedup['batch_1'].total:.4g}"
        assert rows["params (M)"][column] == f"{m.student.size.params / 1e6:.4g}"
    with Image.open(project / "diff.png") as image:
        image.load()
        assert image.format == "PNG" and min(image.size) >= 300

    # seeds: the shared stages are reused, each seed prunes, fine-tunes and evaluates
    seeded = edit_spec(spec, name="tiny_seeds", export=None)  # no export: a faster test
    out = sh([*EVLM, "run", str(seeded), "--seeds", "1,2"], project).stdout
    assert sorted(re.findall(r"Running stage '(tiny_seeds-s\d)-prune'", out)) == [
        "tiny_seeds-s1", "tiny_seeds-s2"]
    assert not re.findall(r"Running stage 'shared-", out)
    assert "tiny_seeds: 2 seeds (1, 2)" in out and "distilled student are shared" in out
    diff = sh([*EVLM, "diff", "tiny_seeds", "--format", "json"], project).stdout
    assert json.loads(diff)["tiny_seeds"]["seeds"] == ["tiny_seeds-s1", "tiny_seeds-s2"]

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
    shared = sh([*EVLM, "diff", "tiny_vqa", "tiny_sweep", "--format", "json"], second).stdout
    assert json.loads(shared)["tiny_sweep"]["metrics"] == json.loads(
        (project / "runs/tiny_sweep/evaluate/metrics.json").read_text())


def copy_checkout(project: Path, target: Path) -> None:
    """Copy what a git clone of `project` would hold: not DVC's cache, its cached outputs
    (dvc.yaml's `outs`; metrics and plots are not cached) or evlm's resume folders."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    cached = {project / out for stage in stages.values() for out in stage.get("outs", [])}
    skipped = cached | {project / ".dvc/cache", project / ".dvc/tmp", project / ".evlm/work"}

    def ignore(folder, names):
        return [n for n in names if Path(folder) / n in skipped]

    shutil.copytree(project, target, ignore=ignore)


def changed_stages(project: Path, package: Path) -> set[str]:
    """The kinds `dvc status` lists after compiling with the evlm package at `package`."""
    sh([*EVLM, "compile", "specs/tiny_vqa.yaml"], project, env_extra={"PYTHONPATH": str(package)})
    status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)
    return ran("".join(f"Running stage '{name}'" for name in status))


@pytest.mark.e2e
def test_code_dependencies_are_exact(finished, tmp_path):
    """Editing a module reruns the stages whose run functions reach it through imports."""
    project, _ = finished
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

