"""Per-task heads, loss and metric, looked up by the spec's `task` key."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from evlm_cli.core.catalogue import CATALOGUE
from evlm_cli.tasks import caption, nlvr2, vqa

# The heads of a pre-trained model: image-text contrast, matching and masked language modelling.
PRETRAIN_HEADS = ("itc", "itm", "mlm")


@dataclass(frozen=True)
class Task:
    """What training and evaluation need to know about a task."""

    name: str
    heads: tuple[str, ...]  # the model heads the task trains and reads
    # Classification tasks: the loss of the logits against the targets, and the per-example
    # metric values, so evaluation can sum across batches and processes.
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    example_scores: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # Contrastive tasks train on image-text pairs with these pre-training terms and weights.
    terms: dict[str, float] = field(default_factory=dict)
    # What the loss compares the logits with: the prepared targets, or for a decoder the next
    # token at each position, read from the batch's own text.
    targets: Callable[[dict[str, torch.Tensor]], torch.Tensor] = lambda batch: batch["targets"]
    # The rows of the logits that logit KD compares (a decoder: only the positions it is
    # trained to predict, not the padding).
    kd_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda logits, targets: logits
    # Scored by generating text (captioning), not by the logits of one pass.
    generative: bool = False

    @property
    def metric_name(self) -> str:
        """The headline metric, as the catalogue names it (evlm_cli.core.catalogue)."""
        return CATALOGUE[self.name].headline

    @property
    def contrastive(self) -> bool:
        return bool(self.terms)


TASKS: dict[str, Task] = {
    "vqa": Task(name="vqa", heads=("vqa",), loss=vqa.vqa_loss,
                example_scores=vqa.vqa_example_scores),
    "nlvr2": Task(name="nlvr2", heads=("nlvr2",), loss=nlvr2.nlvr2_loss,
                  example_scores=nlvr2.nlvr2_example_scores),
    # The decoder's LM head is the pre-trained MLM head, as in X-VLM's captioning model.
    "captioning": Task(name="captioning", heads=("mlm",),
                       loss=caption.lm_loss,
                       targets=lambda b: caption.lm_labels(b["input_ids"], b["attention_mask"]),
                       kd_rows=lambda logits, labels: logits[labels != caption.IGNORE],
                       generative=True),
    # Fine-tuned with ITC and ITM as X-VLM does; evaluation ranks by ITC, re-ranks by ITM.
    "retrieval": Task(name="retrieval", heads=("itc", "itm"), terms={"itc": 1.0, "itm": 1.0}),
}


def task_for(name: str, meta: Mapping, label_smoothing: float) -> Task:
    """TASKS[name] as the prepared data (`meta`) and the spec set it up: captioning learns only
    what follows the prepared prompt, with the spec's label smoothing; VQA with the objective
    the data section chose (`data.vqa_loss`, recorded at prepare); the others as they are."""
    if name == "vqa":
        return dataclasses.replace(TASKS[name], loss=vqa.VQA_LOSSES[meta.get("vqa_loss", "bce")])
    if name != "captioning":
        return TASKS[name]
    loss = caption.CaptionLoss(len(meta.get("caption_prompt_ids", [])), label_smoothing)
    return dataclasses.replace(TASKS[name], targets=loss.targets, loss=loss.loss)
