"""VQA soft scores, accuracy and the per-batch choice of loss."""

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.tasks import TASKS
from evlm_cli.tasks.vqa import answer_scores, is_one_hot, vqa_accuracy, vqa_example_scores, vqa_loss


def test_answer_scores_follow_vqa_definition():
    ten = ["red"] * 2 + ["blue"] * 7 + ["green"]
    assert answer_scores(ten) == pytest.approx({"red": 2 / 3, "blue": 1.0, "green": 1 / 3})
    assert answer_scores(["red"] * 3 + ["blue"] * 7) == pytest.approx({"red": 1.0, "blue": 1.0})
    assert answer_scores(["yes"]) == {"yes": 1.0}
    assert answer_scores(["yes", "no"]) == {"yes": 0.5, "no": 0.5}
    assert answer_scores([]) == {}


def test_accuracy_on_hand_examples():
    # answers: 0 = red, 1 = blue, 2 = green
    targets = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # single answer, predicted right
            [2 / 3, 1.0, 1 / 3],  # 2 of 10 annotators said red, the prediction
            [0.0, 0.0, 1.0],  # single answer, predicted wrong
        ]
    )
    logits = torch.tensor([[3.0, 1.0, 0.0], [5.0, 4.0, 0.0], [0.0, 2.0, 1.0]])
    assert vqa_example_scores(logits, targets).tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert vqa_accuracy(logits, targets) == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert vqa_accuracy(logits[1:2], targets[1:2]) == pytest.approx(2 / 3)


def test_accuracy_is_exact_match_for_single_answers():
    labels = torch.tensor([0, 2, 1, 1])
    targets = F.one_hot(labels, 3).float()
    logits = F.one_hot(torch.tensor([0, 2, 0, 1]), 3).float()
    assert vqa_accuracy(logits, targets) == pytest.approx(0.75)


def test_one_hot_targets_use_cross_entropy():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 4, 1])
    targets = F.one_hot(labels, 5).half()
    assert is_one_hot(targets)
    assert vqa_loss(logits, targets).item() == pytest.approx(F.cross_entropy(logits, labels).item())


@pytest.mark.parametrize(
    "soft_row",
    [[2 / 3, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0, 0.0]],
    ids=["annotators", "no-answer-in-list", "half"],
)
def test_any_soft_row_switches_to_scaled_bce(soft_row):
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0], soft_row])
    assert not is_one_hot(targets)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 3
    assert vqa_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)
    assert vqa_loss(logits, targets).item() != pytest.approx(
        F.cross_entropy(logits, targets.argmax(-1)).item()
    )


def test_loss_has_gradients():
    logits = torch.zeros(2, 3, requires_grad=True)
    vqa_loss(logits, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_registry_entry():
    task = TASKS["vqa"]
    assert task.metric_name == "vqa_accuracy"
    assert task.loss is vqa_loss and task.heads == ("vqa",) and not task.contrastive
