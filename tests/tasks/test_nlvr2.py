"""NLVR2's loss and accuracy on hand-made batches."""

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.tasks.nlvr2 import nlvr2_accuracy, nlvr2_example_scores, nlvr2_loss


def one_hot(labels):
    return F.one_hot(torch.tensor(labels), 2).float()


def test_accuracy_on_a_hand_made_batch():
    # predictions: true, false, true, true, false; labels: true, true, true, false, false
    logits = torch.tensor([[0.1, 2.0], [3.0, -1.0], [-0.5, 0.5], [0.0, 0.2], [1.0, 0.9]])
    targets = one_hot([1, 1, 1, 0, 0])
    assert nlvr2_example_scores(logits, targets).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert nlvr2_accuracy(logits, targets) == pytest.approx(3 / 5)


def test_loss_is_cross_entropy_on_the_label():
    logits = torch.tensor([[0.3, -0.2], [1.5, 0.5]])
    expected = -(torch.log_softmax(logits[0], 0)[0] + torch.log_softmax(logits[1], 0)[1]) / 2
    assert nlvr2_loss(logits, one_hot([0, 1])).item() == pytest.approx(expected.item())


def test_accuracy_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        nlvr2_accuracy(torch.zeros(0, 2), torch.zeros(0, 2))
