"""The task metric of a model over a whole prepared split."""

from __future__ import annotations

import torch

from evlm_cli.data.loader import PreparedData
from evlm_cli.models.vlm import VLM, model_inputs
from evlm_cli.tasks import TASKS
from evlm_cli.train import trim_text


@torch.inference_mode()
def evaluate_task(model: VLM, data: PreparedData, split: str, task: str, batch_size: int,
                  device: torch.device) -> float:
    """The task metric on a whole split (VQA accuracy for VQA)."""
    model.eval().to(device)
    scores, count = 0.0, 0
    for batch in data.split(split).batches(batch_size):
        batch = {k: v.to(device) for k, v in trim_text(batch).items()}
        logits = model.logits(task, model(*model_inputs(batch)))
        scores += TASKS[task].example_scores(logits, batch["targets"]).sum().item()
        count += batch["targets"].shape[0]
    return scores / max(count, 1)
