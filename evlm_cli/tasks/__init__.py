"""Per-task loss and metric, looked up by the spec's `task` key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from evlm_cli.tasks import vqa


@dataclass(frozen=True)
class Task:
    """What training and evaluation need to know about a task."""

    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    metric: Callable[[torch.Tensor, torch.Tensor], float]
    # Per-example metric values, so evaluation can sum across batches and processes.
    example_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# nlvr2, retrieval and captioning join here when their heads and metrics exist.
TASKS: dict[str, Task] = {
    "vqa": Task(
        name="vqa",
        loss=vqa.vqa_loss,
        metric_name="vqa_accuracy",
        metric=vqa.vqa_accuracy,
        example_scores=vqa.vqa_example_scores,
    ),
}
