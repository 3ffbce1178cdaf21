"""An imported task teacher is checked against the task and its data before anything trains."""

from types import SimpleNamespace

import pytest
import torch

from evlm_cli.core.config import OptimConfig
from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.config import make_config
from evlm_cli.models.vlm import VLM
from evlm_cli.recipe.teacher import param_groups, task_teacher
from tests.helpers.xvlm import VOCAB, nlvr2_checkpoint, pretrained_like


def saved(tmp_path, heads, num_answers=0, positions=16):
    torch.manual_seed(0)
    fusion_layers = 2 if "nlvr2" in heads else 1  # NLVR2's fusion layers come in pairs
    model = VLM(make_config(vision=dict(layers=1, width=16, heads=2, ffn=32),
                            text=dict(layers=1, width=16, heads=2, ffn=32),
                            fusion=dict(layers=fusion_layers, width=16, heads=2, ffn=32),
                            image_size=16,
                            patch_size=8, vocab_size=40, max_positions=positions, heads=heads,
                            num_answers=num_answers))
    save_model(model, tmp_path / "teacher")
    return tmp_path / "teacher"


def imported(task, checkpoint, answers=2, max_text_len=16, image_size=16):
    params = SimpleNamespace(task=task, task_teacher=SimpleNamespace(checkpoint=checkpoint,
                                                                     checkpoint_format="evlm"))
    data = SimpleNamespace(meta={"vocab_size": 40, "max_text_len": max_text_len,
                                 "image_size": image_size}, num_answers=answers)
    return task_teacher(params, data, pretrained=None)


def test_a_fitting_task_teacher_is_used_as_it_is(tmp_path):
    path = saved(tmp_path, ["nlvr2"], num_answers=2)
    model, train = imported("nlvr2", path)
    assert not train and "nlvr2" in model.heads
    on_disk = load_model(path).state_dict()
    assert model.state_dict().keys() == on_disk.keys()
    for name, tensor in on_disk.items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize("task, heads, answers, positions, expected", [
    ("captioning", ["itc", "itm"], 0, 16, "has no mlm head for task captioning"),
    ("nlvr2", ["nlvr2"], 2, 8, "has 8 text positions, the task data 16"),
    ("vqa", ["vqa"], 5, 16, "its vqa head scores 5 answers, the task data has 2"),
])
def test_a_task_teacher_that_does_not_fit_is_refused(tmp_path, task, heads, answers, positions,
                                                     expected):
    with pytest.raises(CheckpointError, match=expected):
        imported(task, saved(tmp_path, heads, answers, positions))


def test_a_task_teacher_for_another_image_size_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="takes 16 px images, the task data 32 px"):
        imported("nlvr2", saved(tmp_path, ["nlvr2"], num_answers=2), image_size=32)


def test_a_fresh_head_trains_at_the_full_rate_and_the_pretrained_body_at_its_share(tmp_path):
    """task_teacher.lr_scale: what run_teacher builds from the pre-trained model's tensors."""
    path = saved(tmp_path, ["itc", "itm", "mlm"])
    params = SimpleNamespace(task="nlvr2", task_teacher=SimpleNamespace(checkpoint=None))
    data = SimpleNamespace(num_answers=2, meta={"image_size": 32, "max_text_len": 16})
    model, pretrained = task_teacher(params, data, pretrained=path)
    assert model.config.vision.image_size == 32  # positions resampled
    assert pretrained and not any(name.startswith("heads.nlvr2") for name in pretrained)
    assert "fusion.layers.1.mlp.fc1.weight" in pretrained  # the paired copy of layer 0
    optim_cfg = OptimConfig(epochs=1, max_steps=None, batch_size=8, lr=1e-3, weight_decay=0.01,
                            warmup_ratio=0.1, grad_clip=1.0, checkpoint_every=10,
                            answer_balance=0.0)
    opt = param_groups(model, pretrained, optim_cfg, 0.1)
    lr_of = {id(p): group["lr"] for group in opt.param_groups for p in group["params"]}
    head = {id(p) for p in model.heads["nlvr2"].parameters()}
    assert len(lr_of) == len(list(model.parameters()))  # every tensor trains, once
    assert head and all(lr_of[i] == 1e-3 for i in head)
    assert all(lr_of[id(p)] == pytest.approx(1e-4) for p in model.parameters()
               if id(p) not in head)


def test_the_teacher_stage_imports_an_xvlm_task_teacher(tmp_path):
    state, _ = nlvr2_checkpoint()
    torch.save({"model": state}, tmp_path / "nlvr2.th")
    save_model(VLM(pretrained_like()), tmp_path / "pretrained")
    params = SimpleNamespace(task="nlvr2", task_teacher=SimpleNamespace(
        checkpoint=str(tmp_path / "nlvr2.th"), checkpoint_format="xvlm"))
    data = SimpleNamespace(num_answers=2, meta={"vocab_size": VOCAB, "max_text_len": 16,
                                                "image_size": 32})
    model, train = task_teacher(params, data, pretrained=tmp_path / "pretrained")
    assert train is None and model.config.fusion.layers == 4
    assert torch.equal(model.heads["nlvr2"][3].weight, state["cls_head.3.weight"])
