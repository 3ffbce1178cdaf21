"""VQA as answer classification: soft target scores, the loss, and VQA accuracy."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F

# VQAv2 asks 10 annotators; an answer given by this many of them counts as fully correct.
AGREEING_ANNOTATORS = 3


def answer_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft score of each distinct answer given the annotators' `answers` (repeats allowed).

    With 3 or more annotations (VQAv2 style) an answer scores min(count / 3, 1), the VQA
    accuracy definition. With fewer, one annotator cannot reach agreement, so scores are the
    answer's share instead: a single answer (easy-VQA) scores 1.0, two different ones 0.5 each.
    No answers give no scores (an unlabelled test question).
    """
    counts = Counter(answers)
    total = len(answers)
    if total >= AGREEING_ANNOTATORS:
        return {answer: min(count / AGREEING_ANNOTATORS, 1.0) for answer, count in counts.items()}
    return {answer: count / total for answer, count in counts.items()}


def is_one_hot(targets: torch.Tensor) -> bool:
    """True when every row holds a single 1 and zeros elsewhere."""
    ones = targets == 1
    return bool(((ones | (targets == 0)).all() and (ones.sum(dim=-1) == 1).all()).item())


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Answer-classification loss, chosen per batch from the targets alone.

    One-hot targets (easy-VQA, single answers): cross-entropy on the answer index. Any row with
    soft or missing scores (VQAv2 annotations): binary cross-entropy with logits against the
    scores, averaged and multiplied by the number of answers (the standard VQA recipe, which
    sums over answers and averages over examples).
    """
    targets = targets.to(logits.dtype)
    if is_one_hot(targets):
        return F.cross_entropy(logits, targets.argmax(dim=-1))
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.size(-1)


def vqa_example_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example, the target score of the predicted (argmax) answer: VQA accuracy before the mean."""
    predicted = logits.argmax(dim=-1, keepdim=True)
    return targets.float().gather(-1, predicted).squeeze(-1)


def vqa_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """VQA accuracy: mean over examples of min(#annotators agreeing with the prediction / 3, 1).

    With one answer per question (easy-VQA) this is exact-match accuracy.
    """
    if logits.size(0) == 0:
        raise ValueError("vqa_accuracy needs at least one example")
    return float(vqa_example_scores(logits, targets).mean().item())
