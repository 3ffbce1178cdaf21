"""The stages' objective: its distillation terms see real tokens only, never padding."""

import pytest
import torch

from evlm_cli.compress.objective import Masking, Objective
from evlm_cli.core.config import LossWeights
from evlm_cli.models.config import make_config
from evlm_cli.models.student import paired_layer_map, student_from_teacher
from evlm_cli.models.vlm import VLM, model_inputs, with_heads
from evlm_cli.tasks import TASKS, task_for
from evlm_cli.tasks.caption import IGNORE, lm_labels, lm_loss

# Each classifying task's head, answers and one-hot targets of the batch below.
TASK_SETUP = {"vqa": (["vqa"], 4), "nlvr2": (["nlvr2"], 2), "captioning": (["mlm"], 0)}


def models(task: str = "vqa"):
    torch.manual_seed(0)
    heads, answers = TASK_SETUP[task]
    # NLVR2's models pair the fusion layers of pre-trained ones (X-VLM's), as the stages do
    paired = task == "nlvr2"
    cfg = make_config(vision=dict(layers=2, width=16, heads=2, ffn=32),
                      text=dict(layers=2, width=16, heads=2, ffn=32),
                      fusion=dict(layers=2, width=16, heads=2, ffn=32), image_size=16,
                      patch_size=8, vocab_size=30, max_positions=8,
                      heads=["itm"] if paired else heads, num_answers=answers)
    teacher = VLM(cfg).eval()
    student, maps = student_from_teacher(teacher, {"vision": 1, "text": 1, "fusion": 1})
    if paired:
        teacher, student = (with_heads(m, heads, num_answers=answers).eval()
                            for m in (teacher, student))
        maps = {**maps, "fusion": paired_layer_map(maps["fusion"])}
    # a student that differs from its teacher, so every term is non-zero
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student.eval(), maps


def batch(pad_token: int, task: str = "vqa"):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.tensor([[2, 5, 3, 0, 0], [2, 6, 7, 8, 3]])
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token))
    torch.manual_seed(1)
    images = torch.randn(2, 2, 3, 16, 16) if task == "nlvr2" else torch.randn(2, 3, 16, 16)
    answers = TASK_SETUP[task][1]
    return {"images": images, "input_ids": ids, "attention_mask": mask,
            "targets": torch.eye(max(answers, 2))[:2, :answers]}


@pytest.mark.parametrize("task", list(TASK_SETUP))
def test_padding_changes_no_distillation_term(task):
    # NLVR2's fusion reads both images in one pass; captioning scores every real position
    teacher, student, maps = models(task)
    objective = Objective(student, task, LossWeights(task=1.0, logits=1.0, hidden=1.0, attention=1.0),
                          2.0, teacher, maps)
    with torch.no_grad():
        _, clean = objective(batch(pad_token=0, task=task), 0, 1)
        _, noisy = objective(batch(pad_token=17, task=task), 0, 1)  # other ids under the padding
    assert clean["attention"] > 0 and clean["hidden"] > 0
    for term in ("task", "logits", "hidden", "attention"):
        assert abs(clean[term] - noisy[term]) < 1e-6, term


def test_a_configured_captioning_task_leaves_the_prompt_out_and_smooths_labels():
    """The batch's first text token after [CLS] is a one-token prompt: the task term is the
    smoothed LM loss over what follows it, not the plain loss over every token."""
    teacher, student, maps = models("captioning")
    spec = task_for("captioning", {"caption_prompt_ids": [5]}, 0.1)
    objective = Objective(student, "captioning", LossWeights(task=1.0, logits=1.0, hidden=0.0,
                                                             attention=0.0),
                          2.0, teacher, maps, task_spec=spec)
    data = batch(pad_token=0, task="captioning")
    with torch.no_grad():
        _, terms = objective(data, 0, 1)
        logits = student.logits("captioning", student(*model_inputs(data), causal=True))
        labels = lm_labels(data["input_ids"], data["attention_mask"], prompt_length=1)
        assert (labels[:, 0] == IGNORE).all()
        assert terms["task"] == pytest.approx(float(lm_loss(logits, labels, 0.1)), abs=1e-6)
        _, plain = Objective(student, "captioning", objective.weights, 2.0, teacher, maps)(
            data, 0, 1)
    assert terms["task"] != pytest.approx(plain["task"], abs=1e-4)
    assert task_for("nlvr2", {}, 0.1) is TASKS["nlvr2"]


def pretrain_models(student_layers: int = 1):
    """A teacher with the pre-training heads and a student from its layers."""
    torch.manual_seed(0)
    cfg = make_config(vision=dict(layers=2, width=16, heads=2, ffn=32),
                      text=dict(layers=2, width=16, heads=2, ffn=32),
                      fusion=dict(layers=2, width=16, heads=2, ffn=32), image_size=16,
                      patch_size=8, vocab_size=30, max_positions=8,
                      heads=["itc", "itm", "mlm"], embed_dim=8)
    teacher = VLM(cfg).eval()
    layers = dict.fromkeys(("vision", "text", "fusion"), student_layers)
    student, maps = student_from_teacher(teacher, layers)
    return teacher, student.eval(), maps


def pairs_batch():
    """Four pairs showing three images: rows 0 and 1 are two captions of one image."""
    g = torch.Generator().manual_seed(2)  # the same batch, leaving the global draws alone
    images = torch.randn(3, 3, 16, 16, generator=g)
    ids = torch.randint(5, 30, (4, 6), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return {"images": images[[0, 0, 1, 2]], "input_ids": ids,
            "attention_mask": torch.ones(4, 6, dtype=torch.long),
            "image_index": torch.tensor([0, 0, 1, 2])}


MASKING = Masking(mask_id=4, vocab_size=30, special_ids=(0, 1, 2, 3, 4), prob=0.3)
ALL = LossWeights(task=1.0, logits=1.0, hidden=1.0, attention=1.0)
TASK_ONLY_WEIGHTS = LossWeights(task=1.0, logits=0.0, hidden=0.0, attention=0.0)


def test_the_teacher_answers_the_students_questions():
    """A student that is an exact copy of its teacher: every KD term is zero only if the
    teacher scores the same hard negatives and the same masked tokens the student drew."""
    teacher, student, maps = pretrain_models(student_layers=2)  # every layer: an exact copy
    weights = {"itc": 1.0, "itm": 1.0, "mlm": 1.0}
    objective = Objective(student, "pretrain", ALL, 2.0, teacher, maps, task_weights=weights,
                          masking=MASKING)
    with torch.no_grad():
        for seed in range(3):
            torch.manual_seed(seed)
            _, logs = objective(pairs_batch(), 0, 1)
            assert logs["logits"] < 1e-8 and logs["hidden"] < 1e-10 and logs["attention"] < 1e-10
            assert all(logs[k] > 0 for k in ("itc", "itm", "mlm"))
    # a teacher drawing its own negatives and masks would be asked other questions
    torch.manual_seed(0)
    draws = [(objective.step(student, pairs_batch(), None, {}).choices,
              objective.step(teacher, pairs_batch(), None, {}).choices) for _ in range(5)]
    assert any(not torch.equal(a[k], b[k]) for a, b in draws for k in a)


def test_pretraining_terms_weigh_into_the_task_term_and_train_every_head():
    teacher, student, maps = pretrain_models()
    weights = {"itc": 1.0, "itm": 0.5, "mlm": 2.0}
    objective = Objective(student, "pretrain", ALL, 2.0, teacher, maps, task_weights=weights,
                          masking=MASKING)
    torch.manual_seed(0)
    loss, logs = objective(pairs_batch(), 0, 1)
    assert logs["task"] == pytest.approx(logs["itc"] + 0.5 * logs["itm"] + 2.0 * logs["mlm"],
                                         rel=1e-5)
    expected = sum(logs[k] for k in ("task", "logits", "hidden", "attention"))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for head in ("itc", "itm", "mlm"):
        grads = [p.grad for p in student.heads[head].parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), head
    # a term weighted 0 is not computed at all
    no_mlm = Objective(student, "pretrain", ALL, 2.0, teacher, maps,
                       task_weights={"itc": 1.0, "itm": 1.0, "mlm": 0.0})
    assert "mlm" not in no_mlm(pairs_batch(), 0, 1)[1]


def test_retrieval_trains_itc_and_itm_only():
    teacher, student, maps = pretrain_models()
    objective = Objective(student, "retrieval", ALL, 2.0, teacher, maps)
    _, logs = objective(pairs_batch(), 0, 1)
    assert {"itc", "itm"} <= set(logs) and "mlm" not in logs
    assert logs["task"] == pytest.approx(logs["itc"] + logs["itm"], rel=1e-5)


def test_text_assignment_fuses_each_text_with_the_two_drawn_images_in_their_order():
    teacher, _, _ = pretrain_models()
    assigner = with_heads(teacher, ["ta", "itc"])
    assert assigner.config.fusion.layers == 2 * teacher.config.fusion.layers
    objective = Objective(assigner, "text_assignment", TASK_ONLY_WEIGHTS, 1.0)
    data = pairs_batch()
    torch.manual_seed(0)
    step = objective.step(assigner, data, None, {})
    first, second, labels = (step.choices[k] for k in ("first", "second", "labels"))
    own = torch.arange(4)
    same = data["image_index"]
    # the text's own image sits where its label says, and no negative shows its image
    assert torch.equal(first[labels == 0], own[labels == 0])
    assert torch.equal(second[labels == 1], own[labels == 1])
    for rows, which in ((labels != 0, first), (labels != 1, second)):
        assert (same[which[rows]] != same[rows]).all()
    # the logits are the ta head over the text fused with exactly those two images
    out = assigner.vision(data["images"])
    text = assigner.encode_text(data["input_ids"], data["attention_mask"])
    fused = assigner.fuse(text.last, data["attention_mask"], (out.last[first], out.last[second]))
    expected = assigner.heads["ta"](assigner.pool(fused.last, data["attention_mask"]))
    torch.testing.assert_close(step.logits[0], expected)
    loss, _ = objective(data, 0, 1)
    loss.backward()
    assert assigner.heads["ta"].weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() > 0 for p in assigner.fusion.layers[1].parameters()
               if p.requires_grad and p.grad is not None)


def test_a_model_with_a_paired_head_is_not_paired_again():
    teacher, _, _ = pretrain_models()
    assigner = with_heads(teacher, ["ta", "itc"])
    nlvr2 = with_heads(assigner, ["nlvr2"], num_answers=2)
    assert nlvr2.config.fusion.layers == assigner.config.fusion.layers
    own = assigner.state_dict()
    for key, value in nlvr2.state_dict().items():
        if not key.startswith("heads."):
            assert torch.equal(value, own[key]), key
