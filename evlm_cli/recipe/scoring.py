"""The task metric of a model over a whole prepared split, and the fixed batches it is timed on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from evlm_cli.data.loader import PreparedData
from evlm_cli.models.vlm import VLM, TaskLogits, model_inputs
from evlm_cli.tasks import TASKS
from evlm_cli.train import trim_text

# Task logits from (images, input_ids, attention_mask): a PyTorch model or an exported one.
Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.inference_mode()
def evaluate_forward(forward: Forward, data: PreparedData, split: str, task: str,
                     batch_size: int, device: torch.device) -> float:
    """The task metric of `forward` on a whole split (VQA accuracy for VQA)."""
    scores, count = 0.0, 0
    for batch in data.split(split).batches(batch_size):
        batch = {k: v.to(device) for k, v in trim_text(batch).items()}
        logits = forward(*model_inputs(batch)).to(device)
        scores += TASKS[task].example_scores(logits, batch["targets"]).sum().item()
        count += batch["targets"].shape[0]
    return scores / max(count, 1)


def evaluate_task(model: VLM, data: PreparedData, split: str, task: str, batch_size: int,
                  device: torch.device) -> float:
    """The task metric of a PyTorch model on a whole split."""
    model.eval().to(device)
    return evaluate_forward(TaskLogits(model, task), data, split, task, batch_size, device)


def fixed_batch(data: PreparedData, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first `batch_size` test examples, the same for every model measured."""
    split = data.split("test")
    n = min(batch_size, len(split))
    batch = trim_text(split.gather(torch.arange(n)))
    if n < batch_size:  # tiny smoke data: repeat to the requested size
        reps = -(-batch_size // n)
        batch = {k: v.repeat(reps, *[1] * (v.ndim - 1))[:batch_size] for k, v in batch.items()}
    return model_inputs(batch)
