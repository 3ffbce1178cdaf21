"""End to end with a Swin teacher: the tiny VQA spec's pipeline (pre-training skipped, then
distil, prune, fine-tune, evaluate, export) on a two-stage Swin vision encoder."""

import json
import shutil

import pytest
import torch

from evlm_cli.compress.slice import slice_model
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.vlm import prunable_groups
from tests.helpers.pipeline import EVLM, REPO, edit_spec, sh

# 32-pixel easy-VQA images in 4-pixel patches: stage 0 on 8 x 8 patches (windows of 4, its odd
# layers shifted), stage 1 on 4 x 4 (one window, not shifted).
SWIN = dict(kind="swin", layers=4, depths=[2, 2], width=16, heads=2, ffn=32, patch_size=4,
            window_size=4)


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("swin_spec") / "work"
    (folder / "specs").mkdir(parents=True)
    shutil.copy(REPO / "tests/specs/tiny_vqa.yaml", folder / "tiny_vqa.yaml")
    spec = edit_spec(folder / "tiny_vqa.yaml", name="tiny_swin", **{
        "teacher.vision": SWIN, "pretrain.train.epochs": 0, "student.vision_layers": 2,
        "student.layer_map": {"vision": [1, 2]}})  # one layer per stage: a shifted one, then not
    shutil.move(spec, folder / "specs/tiny_swin.yaml")
    sh([*EVLM, "run", "specs/tiny_swin.yaml"], folder)
    return folder / "runs/tiny_swin"


@pytest.mark.e2e
def test_a_swin_teacher_runs_the_whole_pipeline_and_its_student_exports(swin_run):
    metrics = json.loads((swin_run / "evaluate/metrics.json").read_text())
    assert metrics  # evaluated: the student against the Swin teacher
    (export,) = swin_run.glob("**/export.json")
    assert json.loads(export.read_text())["parity_max_abs_diff"] < 1e-4
    masks = json.loads((swin_run / "prune/masks.json").read_text())
    assert masks["params_after"] < masks["params_before"]
    assert len(masks["shape"]["vision"]["heads"]) == 2  # one layer per stage, widths 16 and 32


@pytest.mark.e2e
def test_the_pruned_swin_student_sliced_again_equals_it_gated(swin_run):
    """The pruned student is an ordinary Swin with an unusual config: it slices like any."""
    model = load_model(swin_run / "prune/model").eval()
    swin = model.config.vision.swin
    assert swin.depths == [1, 1] and swin.shifted == [True, False]
    g = torch.Generator().manual_seed(0)
    gates = {group.name: (torch.rand(group.size, generator=g) > 0.4).float()
             for group in prunable_groups(model.config)}
    images = torch.randn(2, 3, 32, 32, generator=g)
    ids, mask = torch.randint(1, 100, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        gated = model.logits("vqa", model(images, ids, mask, gates=gates))
        sliced = slice_model(model, gates)
        torch.testing.assert_close(sliced.logits("vqa", sliced(images, ids, mask)), gated,
                                   atol=1e-5, rtol=1e-5)
