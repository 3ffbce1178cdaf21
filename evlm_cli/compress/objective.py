"""The training objective of every stage: task loss + weighted distillation terms + sparsity penalty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from evlm_cli.compress import distill as kd
from evlm_cli.config import ENCODERS, LossWeights
from evlm_cli.models.vlm import VLM, model_inputs
from evlm_cli.tasks import TASKS

# Only the task loss: a teacher trained on its own.
TASK_ONLY = LossWeights(task=1.0, logits=0.0, hidden=0.0, attention=0.0)


class Objective:
    """Task loss + weighted distillation terms (+ the sparsity penalty when pruning).

    `modules` holds what it trains besides the student (the learned hidden-state projections),
    for the optimiser and the checkpoint.
    """

    def __init__(self, student: VLM, task: str, weights: LossWeights, temperature: float,
                 teacher: VLM | None = None, layer_maps: dict[str, list[int]] | None = None,
                 gates: nn.Module | None = None, constraint: nn.Module | None = None):
        self.student, self.task, self.weights, self.temperature = student, task, weights, temperature
        use_teacher = teacher is not None and any((weights.logits, weights.hidden, weights.attention))
        self.teacher = [teacher] if use_teacher else []
        self.gates, self.constraint = gates, constraint
        self.layer_maps = layer_maps or {}
        self.hidden = None
        self.modules: dict[str, nn.Module] = {}
        if self.teacher and weights.hidden:
            widths = {e: (student.config.encoder(e).width, teacher.config.encoder(e).width)
                      for e in ENCODERS}
            self.hidden = self.modules["hidden_maps"] = kd.HiddenDistiller(widths)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    def __call__(self, batch: dict[str, Tensor], step: int, total: int) -> tuple[Tensor, dict]:
        w = self.weights
        want_h, want_a = bool(self.hidden), bool(self.teacher and w.attention)
        gates = self.gates() if self.gates is not None and self.constraint.uses_gates else None
        out = self.student(*model_inputs(batch), gates=gates, output_hidden=want_h,
                           output_attentions=want_a)
        logits = self.student.logits(self.task, out)
        terms = {"task": TASKS[self.task].loss(logits, batch["targets"])}
        if self.teacher:
            teacher = self.teacher[0]
            with torch.no_grad():
                t_out = teacher(*model_inputs(batch), output_hidden=want_h, output_attentions=want_a)
                t_logits = teacher.logits(self.task, t_out)
            if w.logits:
                terms["logits"] = kd.logits_kd(logits, t_logits, self.temperature)
            # Padded text tokens are left out of every term: as hidden states and as the query
            # rows of attention maps (text and fusion queries are text tokens; images have none).
            masks = {"vision": None, "text": batch["attention_mask"], "fusion": batch["attention_mask"]}
            if want_h:
                terms["hidden"] = sum(
                    self.hidden.loss(out.encoder(e).hidden_states, t_out.encoder(e).hidden_states,
                                     self.layer_maps[e], masks[e], encoder=e)
                    for e in ENCODERS) / len(ENCODERS)
            if want_a:
                maps = [(out.encoder(e).attentions, t_out.encoder(e).attentions,
                         self.layer_maps[e], masks[e]) for e in ENCODERS]
                maps.append((out.fusion.cross_attentions, t_out.fusion.cross_attentions,
                             self.layer_maps["fusion"], masks["fusion"]))
                terms["attention"] = sum(kd.attention_kd(s, t, m, mask)
                                         for s, t, m, mask in maps) / len(maps)
        loss = sum(getattr(w, k) * v for k, v in terms.items())
        logs = {k: v.item() for k, v in terms.items()}
        if self.constraint is not None and self.constraint.uses_gates:
            loss = loss + self.constraint.loss(step, total)
            logs.update(self.constraint.log_values(step, total))
        return loss, logs
