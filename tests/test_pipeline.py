"""End to end: `evlm run` of the four tiny specs (one per task) in a folder outside the repository
that holds only the specs: sharing, reruns, results, DVC's own views, `evlm diff`."""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from evlm_cli.spec.load import load_schema
from tests.helpers.pipeline import EVLM, REPO, edit_spec, ran, results_of, sh

# One tiny spec per task; they agree on the task-agnostic sections.
TINY_SPECS = ("tiny_vqa", "tiny_itr", "tiny_nlvr2", "tiny_caption")


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
                          "evaluate", "text_assignment"}
    # The four tasks share the task-agnostic stages: each is in dvc.yaml, and ran, once.
    names = re.findall(r"Running stage '([^']+)'", first)
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    for kind in ("prepare_pairs", "teacher_pretrain", "distill"):
        assert sum(n.startswith(f"shared-{kind}-") for n in stages) == 1, kind
        assert sum(n.startswith(f"shared-{kind}-") for n in names) == 1, kind
    for kind in ("prepare", "teacher", "teacher_eval"):  # the task's own, one per task
        assert sum(n.startswith(f"shared-{kind}-") for n in stages) == 4, kind
    # NLVR2's teacher alone starts from text assignment, which ran once, on the shared pairs
    assigned = [n for n in stages if n.startswith("shared-text_assignment-")]
    assert len(assigned) == 1 and sum(n == assigned[0] for n in names) == 1
    taking = [n for n, v in stages.items() if "--assigned" in v["cmd"]]
    assert len(taking) == 1 and taking[0].startswith("shared-teacher-")
    params_file = next(iter(stages[taking[0]]["params"][0]))
    assert yaml.safe_load((project / params_file).read_text())["task"] == "nlvr2"
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
