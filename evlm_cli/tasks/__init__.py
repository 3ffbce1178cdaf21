"""Per-task heads, loss and metric, looked up by the spec's `task` key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from evlm_cli.tasks import vqa

# The heads of a pre-trained model: image-text contrast, matching and masked language modelling.
PRETRAIN_HEADS = ("itc", "itm", "mlm")


@dataclass(frozen=True)
class Task:
    """What training and evaluation need to know about a task."""

    name: str
    heads: tuple[str, ...]  # the model heads the task trains and reads
    metric_name: str
    # Classification tasks: the loss of the logits against the targets, and the per-example
    # metric values, so evaluation can sum across batches and processes.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    example_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Contrastive tasks train on image-text pairs with these pre-training terms and weights.
    terms: dict[str, float] = field(default_factory=dict)

    @property
    def contrastive(self) -> bool:
        return bool(self.terms)


# nlvr2 and captioning join here when their heads and metrics exist.
TASKS: dict[str, Task] = {
    "vqa": Task(name="vqa", heads=("vqa",), metric_name="vqa_accuracy", loss=vqa.vqa_loss,
                example_scores=vqa.vqa_example_scores),
    # Fine-tuned with ITC and ITM as X-VLM does; evaluation ranks by ITC, re-ranks by ITM.
    "retrieval": Task(name="retrieval", heads=("itc", "itm"), metric_name="recall_at_k",
                      terms={"itc": 1.0, "itm": 1.0}),
}
