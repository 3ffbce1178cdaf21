"""NLVR2: is a sentence true of a pair of images? Two-way classification and its accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The prepared answer list: a statement's label indexes it (targets are one-hot over it).
ANSWERS = ("false", "true")


def nlvr2_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the [B, 2] logits against the labels the one-hot targets hold."""
    return F.cross_entropy(logits, targets.argmax(dim=-1))


def nlvr2_example_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1.0 where the predicted label is the true one, else 0.0: accuracy before the mean."""
    return (logits.argmax(dim=-1) == targets.argmax(dim=-1)).float()


def nlvr2_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    if logits.size(0) == 0:
        raise ValueError("nlvr2_accuracy needs at least one example")
    return float(nlvr2_example_scores(logits, targets).mean().item())
