"""The official VQA accuracy (normalisation, leave-one-out), the targets built from it, the loss."""

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.tasks import TASKS, task_for
from evlm_cli.tasks.vqa import (
    accuracy_of_count,
    answer_scores,
    normalize_answer,
    vqa_accuracy,
    vqa_accuracy_of,
    vqa_example_scores,
    vqa_loss,
    vqa_report,
    vqa_soft_ce_loss,
)


def annotators(answer: str, matching: int, other: str = "blue") -> list[str]:
    return [answer] * matching + [other] * (10 - matching)


# k of 10 annotators gave the predicted answer. Leave-one-out over the 10 subsets of 9:
# leaving out one of the k leaves k - 1 matches, leaving out one of the others leaves k,
# and each subset scores min(matches / 3, 1).
@pytest.mark.parametrize("matching, expected", [
    (0, 0.0),
    (1, 0.3),  # (1 x 0/3 + 9 x 1/3) / 10; min(1/3, 1) would say 0.333
    (2, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
    (3, 0.9),  # (3 x 2/3 + 7 x 1) / 10; min(3/3, 1) would say 1.0
    (4, 1.0),  # (4 x 1 + 6 x 1) / 10
    (10, 1.0),
])
def test_ten_annotators_score_by_leave_one_out(matching, expected):
    assert vqa_accuracy_of("red", annotators("red", matching)) == pytest.approx(expected)
    assert accuracy_of_count(matching, 10) == pytest.approx(expected)


# When the annotators disagree, prediction and annotations are normalised first; each row is
# one of the evaluator's rules, and the prediction must match 3 of 10 "blue"-padded answers.
@pytest.mark.parametrize("predicted, given", [
    ("Two", "2"),  # lower case, then number words as digits
    ("two", "2"),
    ("none", "0"),
    ("2.", "2"),  # a period not followed by a digit goes
    ("yes!", "yes"),  # a mark that touches no space becomes a space, then spaces collapse
    ("the dog", "dog"),  # articles go
    ("a red ball", "red ball"),
    ("dont", "don't"),  # contractions get their apostrophe back
    ("1,000", "1000"),  # with a comma between digits, every mark is deleted
    ("red, green", "red green"),  # a mark beside a space is deleted
    ("black-and-white", "black and white"),  # a mark inside a word becomes a space
])
def test_disagreeing_annotators_are_compared_normalised(predicted, given):
    assert vqa_accuracy_of(predicted, annotators(given, 3)) == pytest.approx(0.9)


def test_the_decimal_point_survives_normalisation():
    assert normalize_answer("2.5") == "2.5"
    assert vqa_accuracy_of("2.5", annotators("25", 3)) == 0.0


def test_agreeing_annotators_are_compared_as_written():
    # The evaluator normalises only when the annotators disagree: "Two" against ten "2" is 0.
    assert vqa_accuracy_of("2", ["2"] * 10) == 1.0
    assert vqa_accuracy_of("Two", ["2"] * 10) == 0.0
    assert vqa_accuracy_of(" 2\n", ["2"] * 10) == 1.0  # surrounding whitespace always goes


def test_fewer_than_three_annotators_score_their_share():
    assert vqa_accuracy_of("yes", ["yes"]) == 1.0  # one annotator (easy-VQA): exact match
    assert vqa_accuracy_of("no", ["yes"]) == 0.0
    assert vqa_accuracy_of("yes", ["yes", "no"]) == 0.5


def test_targets_are_each_candidates_official_score():
    candidates = ["2", "blue", "red", "dog"]
    given = ["two"] * 2 + ["Blue"] * 7 + ["the dog"]
    scores = answer_scores(given, candidates)
    assert scores == pytest.approx({0: 0.6, 1: 1.0, 3: 0.3})
    for index, candidate in enumerate(candidates):
        assert scores.get(index, 0.0) == pytest.approx(vqa_accuracy_of(candidate, given))
    assert answer_scores([], candidates) == {}


def test_report_averages_overall_and_per_answer_type():
    report = vqa_report(["yes", "2", "red"],
                        [["yes"] * 10, annotators("2", 1), annotators("red", 3)],
                        ["yes/no", "number", "other"])
    assert report["value"] == pytest.approx((1.0 + 0.3 + 0.9) / 3)
    assert report["by_answer_type"] == pytest.approx({"yes/no": 1.0, "number": 0.3, "other": 0.9})
    assert vqa_report(["yes"], [["yes"]], [None])["by_answer_type"] is None


def test_example_scores_gather_the_predicted_answers_target():
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.6, 1.0, 0.3], [0.0, 0.0, 1.0]])
    logits = torch.tensor([[3.0, 1.0, 0.0], [5.0, 4.0, 0.0], [0.0, 2.0, 1.0]])
    assert vqa_example_scores(logits, targets).tolist() == pytest.approx([1.0, 0.6, 0.0])
    assert vqa_accuracy(logits, targets) == pytest.approx(1.6 / 3)


@pytest.mark.parametrize("rows", [
    [[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 1.0, 0]],  # one answer each
    [[1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0], [0.6, 1.0, 0, 0, 0]],  # one row of soft scores
], ids=["one-hot", "soft"])
def test_the_loss_is_scaled_bce_whatever_the_batch_holds(rows):
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor(rows)
    expected = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 3
    assert vqa_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_has_gradients():
    logits = torch.zeros(2, 3, requires_grad=True)
    vqa_loss(logits, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_registry_entry():
    task = TASKS["vqa"]
    assert task.metric_name == "vqa_accuracy"
    assert task.loss is vqa_loss and task.heads == ("vqa",) and not task.contrastive


def test_soft_ce_is_cross_entropy_against_the_normalised_scores():
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    one_hot = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0]])
    assert vqa_soft_ce_loss(logits, one_hot).item() == pytest.approx(
        F.cross_entropy(logits, one_hot.argmax(-1)).item(), rel=1e-6)
    soft = torch.tensor([[0.6, 0.9, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 0]])  # the last: no answer
    weights = soft[:2] / soft[:2].sum(-1, keepdim=True)
    expected = -(weights * F.log_softmax(logits[:2], -1)).sum(-1).mean()
    assert vqa_soft_ce_loss(logits, soft).item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_prepared_data_chooses_the_vqa_objective():
    assert task_for("vqa", {"vqa_loss": "soft_ce"}, 0.0).loss is vqa_soft_ce_loss
    assert task_for("vqa", {"vqa_loss": "bce"}, 0.0).loss is vqa_loss
