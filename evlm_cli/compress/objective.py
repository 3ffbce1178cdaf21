"""The training objective of every stage: task loss + weighted distillation terms + sparsity penalty.

Two kinds of task step feed it. VQA and NLVR2 classify one forward pass, and captioning
predicts each next token in one causal pass. Pre-training and retrieval contrast: ITC over
the two unimodal encoders, ITM on positive pairs and hard negatives, and (pre-training) MLM
through the fusion encoder. Either way the step returns the forward pass
whose hidden states and attention maps KD compares, the task terms, and the logits KD
compares. The teacher replays the student's random choices (negatives, masked tokens), so
both are asked the same questions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evlm_cli.compress import distill as kd
from evlm_cli.core.config import ENCODERS, LossWeights
from evlm_cli.models.blocks import Gates
from evlm_cli.models.vlm import CAUSAL_TASKS, VLM, VLMOutput, model_inputs
from evlm_cli.tasks import TASKS, Task
from evlm_cli.tasks import pretrain as objectives
from evlm_cli.tasks.pretrain import Masking, NegativeRule

# The objective of NLVR2's domain pre-training (`assign_step`), named as a task.
TEXT_ASSIGNMENT = "text_assignment"
# Only the task loss: a teacher trained on its own.
TASK_ONLY = LossWeights(task=1.0, logits=0.0, hidden=0.0, attention=0.0)


@dataclass
class Step:
    """One model's answer to a batch."""

    out: VLMOutput  # the forward pass of the real pairs: what hidden and attention KD compare
    terms: dict[str, Tensor]  # the task's own loss terms, unweighted
    logits: list[Tensor]  # the predictions logit KD compares, in a fixed order
    choices: dict[str, Tensor] = field(default_factory=dict)  # random draws the teacher replays


def classify_step(model: VLM, batch: dict[str, Tensor], task: str, gates: Gates | None,
                  opts: dict, spec: Task | None = None) -> Step:
    """One pass and its task loss: VQA and NLVR2 classify; captioning predicts each next
    token of the reference (teacher forcing). `spec` is the task as the data and the spec set
    it up (`tasks.task_for`); by default TASKS[task]."""
    spec = spec or TASKS[task]
    out = model(*model_inputs(batch), gates=gates, causal=task in CAUSAL_TASKS, **opts)
    logits = model.logits(task, out)
    targets = spec.targets(batch)
    return Step(out, {"task": spec.loss(logits, targets)}, [spec.kd_rows(logits, targets)])


def contrast_step(model: VLM, batch: dict[str, Tensor], weights: dict[str, float],
                  masking: Masking | None, gates: Gates | None, opts: dict,
                  choices: dict[str, Tensor] | None = None,
                  negative_rule: NegativeRule | None = None) -> Step:
    """ITC, ITM with hard negatives and MLM on a batch of image-text pairs.

    Terms with weight 0 are not computed. `choices` (the student's draws) replays the same
    negatives and masks for the teacher; without it they are drawn here, as `negative_rule`
    says (by default evlm's earlier one: in-process ITC, no floor).
    """
    rule = negative_rule or NegativeRule()
    images, ids, mask = model_inputs(batch)
    image_ids = batch["image_index"]
    drawn = dict(choices or {})
    vision = model.vision(images, gates=gates, **opts)
    text = model.encode_text(ids, mask, gates=gates, **opts)
    fused = model.fuse(text.last, mask, vision.last, gates=gates, **opts)
    out = VLMOutput(vision, text, fused, mask)
    terms, logits = {}, []
    sim = model.similarity(vision.last, text.last)
    if weights.get("itc"):
        itc_sim, itc_ids = sim, image_ids
        if rule.across_processes:
            images, texts, itc_ids = objectives.global_batch(vision.last[:, :1],
                                                             text.last[:, :1], image_ids)
            itc_sim = model.similarity(images, texts)
        terms["itc"] = objectives.itc_loss(itc_sim, itc_ids)
        logits += [itc_sim, itc_sim.t()]
    if weights.get("itm"):
        if "negative_text" not in drawn:
            drawn["negative_text"], drawn["negative_image"] = objectives.sample_hard_negatives(
                sim.detach().float(), image_ids, hard_share=rule.hard_share, floor=rule.floor)
        neg_text, neg_image = drawn["negative_text"], drawn["negative_image"]
        # Each image with a wrong caption, then each caption with a wrong image.
        negatives = model.fuse(torch.cat([text.last[neg_text], text.last]),
                               torch.cat([mask[neg_text], mask]),
                               torch.cat([vision.last, vision.last[neg_image]]), gates=gates)
        positive = model.match_logits(fused.last, mask)
        negative = model.match_logits(negatives.last, torch.cat([mask[neg_text], mask]))
        terms["itm"] = objectives.itm_loss(positive, negative)
        logits.append(torch.cat([positive, negative]))
    if weights.get("mlm"):
        if "masked_ids" not in drawn:
            drawn["masked_ids"], drawn["mlm_labels"] = objectives.mask_text(ids, mask, masking)
        labels = drawn["mlm_labels"]
        masked = model.encode_text(drawn["masked_ids"], mask, gates=gates)
        fused_masked = model.fuse(masked.last, mask, vision.last, gates=gates)
        chosen = labels != -100
        # The vocabulary projection runs at masked positions only: most tokens are not asked.
        predicted = model.mlm_logits(fused_masked.last[chosen])
        terms["mlm"] = objectives.mlm_loss(predicted[None], labels[chosen][None])
        logits.append(predicted)
    return Step(out, terms, logits, drawn)


def assign_step(model: VLM, batch: dict[str, Tensor], gates: Gates | None, opts: dict,
                choices: dict[str, Tensor] | None = None, hard_share: float = 1.0) -> Step:
    """Text assignment (X-VLM's NLVR2 domain pre-training) on a batch of image-text pairs:
    each text fused with two of the batch's images, fusion layer 2i reading the first and
    2i + 1 the second, as NLVR2 reads its pair; the `ta` head says which image the text
    describes, or neither (`pretrain.assignment_draws`). Images are encoded once each; the
    ITC projection that draws the negatives gets no gradient, as in X-VLM. Positives are the
    examples that show the same picture as far as the captions can tell (`image_group`, where
    the data has it), so two images with the same captions are never each other's negatives.
    `hard_share`: the share of negatives drawn by similarity, the rest evenly.
    """
    images, ids, mask = model_inputs(batch)
    drawn = dict(choices or {})
    vision = model.vision(images, gates=gates, **opts)
    if "first" not in drawn:
        with torch.no_grad():
            embeds = model.heads["itc"].image_embeds(vision.last[:, 0].detach())
        groups = batch.get("image_group", batch["image_index"])
        drawn["first"], drawn["second"], drawn["labels"] = objectives.assignment_draws(
            embeds, groups, hard_share=hard_share)
    text = model.encode_text(ids, mask, gates=gates, **opts)
    pair = (vision.last[drawn["first"]], vision.last[drawn["second"]])
    fused = model.fuse(text.last, mask, pair, gates=gates, **opts)
    logits = model.heads["ta"](model.pool(fused.last, mask))
    return Step(VLMOutput(vision, text, fused, mask),
                {"task": F.cross_entropy(logits, drawn["labels"])}, [logits], drawn)


class Objective:
    """Task loss + weighted distillation terms (+ the sparsity penalty when pruning).

    `task` is a task name ("vqa", "nlvr2", "retrieval", "captioning"), "pretrain" or
    "text_assignment". `task_weights` weighs the
    contrastive terms (itc, itm, mlm) of pre-training and retrieval into the task term, and
    `negative_rule` says where ITC and ITM find their negatives. `task_spec` is a classifying
    or generative task as the data and the spec set it up (`tasks.task_for`).
    `modules` holds what it trains besides the student (the learned hidden-state projections),
    for the optimiser and the checkpoint.
    """

    def __init__(self, student: VLM, task: str, weights: LossWeights, temperature: float,
                 teacher: VLM | None = None, layer_maps: dict[str, list[int]] | None = None,
                 gates: nn.Module | None = None, constraint: nn.Module | None = None,
                 task_weights: dict[str, float] | None = None, masking: Masking | None = None,
                 negative_rule: NegativeRule | None = None, task_spec: Task | None = None):
        self.student, self.task, self.weights, self.temperature = student, task, weights, temperature
        self.task_spec = task_spec
        self.contrastive = task == "pretrain" or (task in TASKS and TASKS[task].contrastive)
        if self.contrastive:
            self.task_weights = dict(task_weights or TASKS[task].terms)
            if self.task_weights.get("mlm") and masking is None:
                raise ValueError("MLM needs the tokenizer's masking settings")
        self.masking, self.negative_rule = masking, negative_rule
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

    def step(self, model: VLM, batch: dict[str, Tensor], gates: Gates | None, opts: dict,
             choices: dict[str, Tensor] | None = None) -> Step:
        if self.task == TEXT_ASSIGNMENT:
            hard_share = self.negative_rule.hard_share if self.negative_rule else 1.0
            return assign_step(model, batch, gates, opts, choices, hard_share)
        if self.contrastive:
            return contrast_step(model, batch, self.task_weights, self.masking, gates, opts,
                                 choices, self.negative_rule)
        return classify_step(model, batch, self.task, gates, opts, self.task_spec)

    def __call__(self, batch: dict[str, Tensor], step: int, total: int) -> tuple[Tensor, dict]:
        w = self.weights
        opts = {"output_hidden": bool(self.hidden),
                "output_attentions": bool(self.teacher and w.attention)}
        gates = self.gates() if self.gates is not None and self.constraint.uses_gates else None
        mine = self.step(self.student, batch, gates, opts)
        terms = dict(mine.terms)
        if self.contrastive:
            terms = {**{k: v.detach() for k, v in terms.items()},
                     "task": sum(self.task_weights[k] * v for k, v in mine.terms.items())}
        if self.teacher:
            with torch.no_grad():
                theirs = self.step(self.teacher[0], batch, None, opts, mine.choices)
            terms.update(self.distillation(mine, theirs))
        loss = sum(getattr(w, k) * v for k, v in terms.items() if hasattr(w, k))
        logs = {k: v.item() for k, v in terms.items()}
        if self.constraint is not None and self.constraint.uses_gates:
            loss = loss + self.constraint.loss(step, total)
            logs.update(self.constraint.log_values(step, total))
        return loss, logs

    def distillation(self, mine: Step, theirs: Step) -> dict[str, Tensor]:
        w, out, t_out = self.weights, mine.out, theirs.out
        terms = {}
        if w.logits:
            terms["logits"] = sum(kd.logits_kd(s, t, self.temperature)
                                  for s, t in zip(mine.logits, theirs.logits, strict=True)
                                  ) / len(mine.logits)
        # Padded text tokens are left out of every term: as hidden states and as the query
        # rows of attention maps (text and fusion queries are text tokens; images have none).
        masks = {"vision": None, "text": out.text_mask, "fusion": out.text_mask}
        if self.hidden:
            terms["hidden"] = sum(
                self.hidden.loss(out.encoder(e).hidden_states, t_out.encoder(e).hidden_states,
                                 self.layer_maps[e], masks[e], encoder=e)
                for e in ENCODERS) / len(ENCODERS)
        if w.attention:
            maps = [(out.encoder(e).attentions, t_out.encoder(e).attentions,
                     self.layer_maps[e], masks[e]) for e in ENCODERS]
            maps.append((out.fusion.cross_attentions, t_out.fusion.cross_attentions,
                         self.layer_maps["fusion"], masks["fusion"]))
            terms["attention"] = sum(kd.attention_kd(s, t, m, mask)
                                     for s, t, m, mask in maps) / len(maps)
        return terms
