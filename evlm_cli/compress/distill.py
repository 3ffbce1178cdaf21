"""Distillation losses: logits KD, hidden-state MSE and attention-map MSE over mapped layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def logits_kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) of the softened distributions, per row (`batchmean`), times T^2.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015). Logits of
    more than 2 dimensions ([batch, tokens, classes]) count every leading position as a row.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logits shapes differ: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().reshape(-1, classes).float() / temperature,
                            dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _embedding_offset(student_hidden: Sequence[Tensor], n_student_layers: int) -> int:
    """1 when the lists start with the input embeddings (as EncoderOutput.hidden_states do)."""
    offset = len(student_hidden) - n_student_layers
    if offset not in (0, 1):
        raise ValueError(f"student has {len(student_hidden)} hidden states for "
                         f"{n_student_layers} mapped layers; expected one per layer, "
                         "optionally after the embeddings")
    return offset


def _masked_mse(student: Tensor, teacher: Tensor, token_mask: Tensor | None) -> Tensor:
    """MSE over all elements, or over real tokens only when a [batch, tokens] mask is given.

    Under several processes each divides its sum by the mean count over the processes, not by
    its own: averaging the processes' gradients (as DDP does) then gives the gradient of the
    MSE over every process's real tokens, what one process computes on the whole batch.
    """
    if token_mask is None:
        return F.mse_loss(student, teacher)
    mask = token_mask.to(student.dtype)
    while mask.dim() < student.dim():
        mask = mask.unsqueeze(-1)
    squared = (student - teacher) ** 2 * mask
    # Each real token contributes every element of its trailing dimensions.
    elements = _mean_over_processes(mask.expand_as(squared).sum()).clamp(min=1.0)
    return squared.sum() / elements


def _mean_over_processes(count: Tensor) -> Tensor:
    """`count`'s mean over the processes of a torch.distributed group; `count` outside one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    total = count.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


class HiddenDistiller(nn.Module):
    """Hidden-state MSE per encoder, through a learned linear map where widths differ.

    `widths` maps encoder -> (student width, teacher width). Equal widths get an identity; the
    learned maps (one per encoder, shared by its layers, as in TinyBERT) belong in the student's
    optimiser.
    """

    def __init__(self, widths: dict[str, tuple[int, int]]):
        super().__init__()
        self.projections = nn.ModuleDict({
            enc: nn.Identity() if s == t else nn.Linear(s, t) for enc, (s, t) in widths.items()})

    def loss(self, student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor],
             layer_map: Sequence[int], attention_mask: Tensor | None = None, *,
             encoder: str | None = None) -> Tensor:
        """Mean over student layers i of MSE(proj(student[i]), teacher[layer_map[i]]).

        The lists hold one [batch, tokens, width] tensor per layer, optionally preceded by the
        input embeddings (then both lists must have it; embeddings are not matched).
        `attention_mask` ([batch, tokens], 1 = real token) leaves padding out of the mean.
        `encoder` picks the projection; it may be omitted when only one encoder is registered.
        """
        projection = self._projection(encoder)
        # Both lists come from the same kind of encoder output, so they share the offset.
        offset = _embedding_offset(student_hidden, len(layer_map))
        if max(layer_map, default=-1) + offset >= len(teacher_hidden):
            raise ValueError(f"layer map {list(layer_map)} reaches past the teacher's "
                             f"{len(teacher_hidden) - offset} layers")
        losses = [_masked_mse(projection(student_hidden[i + offset]),
                              teacher_hidden[j + offset].detach(), attention_mask)
                  for i, j in enumerate(layer_map)]
        return torch.stack(losses).mean()

    def _projection(self, encoder: str | None) -> nn.Module:
        if encoder is None:
            if len(self.projections) != 1:
                raise ValueError(f"name the encoder: the distiller has {list(self.projections)}")
            return next(iter(self.projections.values()))
        if encoder not in self.projections:
            raise ValueError(f"no hidden projection for encoder {encoder!r}; "
                             f"have {list(self.projections)}")
        return self.projections[encoder]


def attention_kd(student_maps: Sequence[Tensor | None], teacher_maps: Sequence[Tensor | None],
                 layer_map: Sequence[int], attention_mask: Tensor | None = None) -> Tensor:
    """MSE between attention probabilities [batch, heads, queries, keys] of mapped layers.

    Equal head counts compare head by head. After pruning the student may have fewer heads, and
    which student head plays which teacher head is unknown, so then the head-averaged maps are
    compared. A student layer without attention (None, or all heads pruned) is skipped.
    `attention_mask` ([batch, queries], 1 = real) leaves padded query rows out.
    """
    if len(student_maps) != len(layer_map):
        raise ValueError(f"{len(student_maps)} student attention maps for a layer map of "
                         f"{len(layer_map)} layers")
    losses = []
    for student, j in zip(student_maps, layer_map, strict=True):
        teacher = teacher_maps[j]
        if student is None or student.shape[1] == 0 or teacher is None:
            continue
        teacher = teacher.detach()
        if student.shape[1] != teacher.shape[1]:
            student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
        # Query positions are dim 2; move them next to the batch so the token mask lines up.
        losses.append(_masked_mse(student.transpose(1, 2), teacher.transpose(1, 2),
                                  attention_mask))
    if not losses:
        reference = next((m for m in teacher_maps if m is not None), None)
        device = reference.device if reference is not None else None
        return torch.zeros((), device=device)
    return torch.stack(losses).mean()
