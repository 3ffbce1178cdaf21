"""Vision-language pre-training objectives (ALBEF / X-VLM): ITC, ITM with hard negatives, MLM.

All are functions of tensors; `global_batch` alone talks to the other training processes (it
gathers their examples, ITC's negatives). Examples are paired by position: row i of a
similarity matrix is the image of example i and column j the text of example j. Several
examples may show one image (COCO has five captions per image); `image_ids` says which, and
examples that share an image id are positives of each other, never negatives (X-VLM's
idx-based targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

TERMS = ("itc", "itm", "mlm")

# Label of a position the MLM loss skips; F.cross_entropy's default ignore_index.
IGNORE_INDEX = -100
# BERT's split of the chosen tokens: this share becomes [MASK], the next share a random token,
# and the rest stay as they are (so the model cannot rely on seeing [MASK] at every target).
MASK_SHARE = 0.8
RANDOM_SHARE = 0.1
# X-VLM's n-gram spans (its skipgram_size 3): a span covers 2 or 3 positions, equally likely.
SPAN_SIZES = (2, 3)
# What marks a WordPiece piece that continues the word before it.
CONTINUATION_PREFIX = "##"


@dataclass(frozen=True)
class NegativeRule:
    """Where ITC and ITM find their negatives.

    `across_processes`: ITC contrasts each example with the whole global batch, every
    process's examples gathered (X-VLM's AllGather), so N processes compute the loss one
    process would. `hard_share`: the share of ITM negatives drawn by ITC similarity, the rest
    evenly. `floor`: added to every ITM weight after the softmax, as X-VLM adds 1e-5; once ITC
    is confident the softmax leaves the negatives next to nothing, and the floor then turns
    part of the draws into even ones.
    """

    across_processes: bool = False
    hard_share: float = 1.0
    floor: float = 0.0


@dataclass(frozen=True)
class Masking:
    """How MLM masks text: the tokenizer's ids and the rule.

    `whole_words` picks X-VLM's rule (`mask_whole_words`: a count per caption from `prob`,
    capped at `max_masks`, whole words, some as n-gram spans with `span_prob`); otherwise each
    token is drawn on its own with `prob` (`mask_tokens`). `continuation_ids` are the
    vocabulary's "##" pieces, which tell where a word ends.
    """

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]
    prob: float
    whole_words: bool = False
    max_masks: int = 8
    span_prob: float = 0.0
    continuation_ids: tuple[int, ...] = ()


def continuation_ids(vocab: dict[str, int]) -> tuple[int, ...]:
    """The ids of a WordPiece vocabulary's pieces that continue a word ("##ing")."""
    return tuple(sorted(i for token, i in vocab.items() if token.startswith(CONTINUATION_PREFIX)))


def _positive_mask(image_ids: Tensor, batch_size: int) -> Tensor:
    if image_ids.shape != (batch_size,):
        raise ValueError(
            f"image_ids must have shape ({batch_size},) to match the similarity matrix, "
            f"got {tuple(image_ids.shape)}"
        )
    return image_ids.unsqueeze(1) == image_ids.unsqueeze(0)


def _square(sim_i2t: Tensor) -> int:
    if sim_i2t.dim() != 2 or sim_i2t.size(0) != sim_i2t.size(1):
        raise ValueError(
            f"sim_i2t must be a square [batch, batch] matrix, got {tuple(sim_i2t.shape)}"
        )
    return sim_i2t.size(0)


def itc_loss(sim_i2t: Tensor, image_ids: Tensor) -> Tensor:
    """Image-text contrastive loss: mean of the image->text and text->image soft cross-entropies.

    `sim_i2t` [B, B] holds logits already divided by the temperature. Each row's target spreads
    its mass evenly over the positives (every example with the same image id, itself included),
    so two captions of one image in a batch are not pushed apart.
    """
    positive = _positive_mask(image_ids, _square(sim_i2t)).to(sim_i2t.dtype)
    # The positive relation is symmetric, so the same targets serve both directions.
    targets = positive / positive.sum(dim=1, keepdim=True)
    loss_i2t = -(F.log_softmax(sim_i2t, dim=1) * targets).sum(dim=1).mean()
    loss_t2i = -(F.log_softmax(sim_i2t.t(), dim=1) * targets).sum(dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def _in_process_group() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherRows(torch.autograd.Function):
    """Every process's rows, in rank order, with a gradient back to this process's own."""

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:
        dist = torch.distributed
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows.contiguous())
        ctx.start, ctx.count = dist.get_rank() * rows.shape[0], rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every process's loss reads every process's rows, so a row's gradient is the sum of
        # all the processes' gradients for it; the training loop then averages over processes.
        # X-VLM's AllGather passes on this process's share alone, so after the average its
        # encoders get 1/N of the one-process ITC gradient.
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.start:ctx.start + ctx.count]


def global_batch(image_cls: Tensor, text_cls: Tensor, image_ids: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The [CLS] tokens and image ids of every process's share of the batch, in rank order:
    what one process training on the global batch holds. Unchanged in one process.

    Every process must hold the same number of examples (the loop's equal shards). Gradients
    reach this process's rows so that, once averaged over the processes, they equal one
    process's on the global batch.
    """
    if not _in_process_group():
        return image_cls, text_cls, image_ids
    # One gather for both sides: one collective in the forward pass and one in the backward
    # pass, so the processes cannot issue them in different orders.
    dtype = torch.promote_types(image_cls.dtype, text_cls.dtype)
    joined = _GatherRows.apply(torch.cat([image_cls.to(dtype), text_cls.to(dtype)], dim=-1))
    images, texts = joined.split([image_cls.shape[-1], text_cls.shape[-1]], dim=-1)
    ids = [torch.empty_like(image_ids) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(ids, image_ids.contiguous())
    return images.to(image_cls.dtype), texts.to(text_cls.dtype), torch.cat(ids)


def _draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    # Random draws happen where the generator lives (a CPU generator cannot feed a CUDA draw).
    return generator.device if generator is not None else like.device


def negative_probs(sim_i2t: Tensor, image_ids: Tensor, hard_share: float = 1.0,
                   floor: float = 0.0) -> Tensor:
    """Each row's distribution over its negatives [B, B]: `hard_share` of the mass by ITC
    similarity (ALBEF's hard negatives), the rest spread evenly over them.

    The similarity weights are X-VLM's: softmax(sim) over the whole row, positives included,
    plus `floor`, then positives set to 0 and the row renormalised. Without a floor that is
    the softmax over the negatives alone; with one, a row whose positive takes nearly all the
    softmax draws its negatives nearly evenly. A negative is an example with a different image
    id; positives, the example itself included, get probability 0. A batch of one image has no
    negatives (ValueError).
    """
    if not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"hard_share must lie in [0, 1], got {hard_share}")
    if floor < 0.0:
        raise ValueError(f"the hard negatives' floor must be at least 0, got {floor}")
    positive = _positive_mask(image_ids, _square(sim_i2t))
    negative = ~positive
    if not negative.any(dim=1).all():
        raise ValueError(
            "hard negative mining needs at least two different images in a batch, but every "
            f"example shows image id {image_ids[0].item()}; mix images within each batch"
        )
    logits = sim_i2t.detach().float()
    # Masking the logits before the softmax keeps the negatives' weights exact even when a
    # positive's similarity is so large that the plain softmax would round the others to 0.
    on_negatives = logits.masked_fill(positive, float("-inf"))
    hard = F.softmax(on_negatives, dim=1)
    even = negative.float() / negative.sum(dim=1, keepdim=True)
    if floor > 0.0:
        # (p_j + floor) / sum_k (p_k + floor) over the negatives, with p the whole row's
        # softmax, is a mix of `hard` and `even`: the negatives' softmax mass against the
        # floors' total decides how much of each.
        negatives_mass = (on_negatives.logsumexp(1) - logits.logsumexp(1)).exp().unsqueeze(1)
        floors = floor * negative.sum(dim=1, keepdim=True)
        from_softmax = negatives_mass / (negatives_mass + floors)
        hard = from_softmax * hard + (1.0 - from_softmax) * even
    return hard_share * hard + (1.0 - hard_share) * even


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor, image_ids: Tensor, generator: torch.Generator | None = None,
    hard_share: float = 1.0, floor: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """ALBEF's hard negative mining: (a negative text per image, a negative image per text).

    Each row draws one index from `negative_probs` of that row (image to text) or column
    (text to image). With `hard_share` 1 every draw is ALBEF's; below 1 some negatives are
    drawn evenly, so ITM also sees easy ones. Once ITC has learnt, hard negatives alone
    differ from the positive in one small detail, and on a small budget ITM never starts
    (easy-VQA pairs: its loss stayed at the constant predictor's until half the negatives
    were even). X-VLM's `floor` mixes in even draws too, most where ITC is most confident.
    Both results are int64 tensors of shape [B] with no gradient.
    """
    device = _draw_device(generator, sim_i2t)
    negatives = []
    for rows in (sim_i2t, sim_i2t.t()):
        probs = negative_probs(rows, image_ids, hard_share, floor).to(device)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        negatives.append(drawn.to(sim_i2t.device))
    return negatives[0], negatives[1]


# Text assignment (X-VLM's NLVR2 domain pre-training, `models/model_nlvr_pretrain.py`): a text
# fused with two images describes the first (label 0), the second (1) or neither (2).
ASSIGNMENT_LABELS = 3
# The scale of the image-image similarity its negatives are drawn by (X-VLM's fixed 0.07).
ASSIGNMENT_TEMPERATURE = 0.07


@torch.no_grad()
def assignment_draws(image_embeds: Tensor, image_ids: Tensor,
                     generator: torch.Generator | None = None, hard_share: float = 1.0
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """Text assignment's questions for a batch of image-text pairs: for the text of each
    example, two images of the batch and which of them it describes.

    `image_embeds` [B, D] are the images' normalised ITC embeddings; examples that share an
    image id are each other's positives, never negatives. As X-VLM: a third of the texts see
    their own image first and a negative second (label 0), a third the other way round (1),
    and a third two different negatives (2, or one negative twice where the batch holds only
    one); negatives are drawn by softmax(image-image similarity / 0.07) over the row's
    negatives, and with `hard_share` below 1 that share of the draws so, the rest evenly (as
    `pretrain.hard_negatives` does for ITM). Returns (first, second, labels): int64 [B] each,
    rows of the batch's images.
    """
    sim = image_embeds.float() @ image_embeds.float().t() / ASSIGNMENT_TEMPERATURE
    device = _draw_device(generator, sim)
    probs = negative_probs(sim, image_ids, hard_share).to(device)
    rows = torch.arange(len(probs), device=device)
    negative = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    others = probs.clone()
    others[rows, negative] = 0.0
    alone = others.sum(1) == 0  # no second negative: the first one twice still says "neither"
    others[alone] = probs[alone]
    second_negative = torch.multinomial(others, 1, generator=generator).squeeze(1)
    labels = torch.randint(ASSIGNMENT_LABELS, (len(probs),), generator=generator, device=device)
    first = torch.where(labels == 0, rows, negative)
    second = torch.where(labels == 0, negative, torch.where(labels == 1, rows, second_negative))
    return tuple(t.to(image_embeds.device) for t in (first, second, labels))


def itm_loss(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Cross-entropy on 2-way match logits [N, 2]: label 1 for `pos_logits`, 0 for `neg_logits`.

    The mean runs over all rows together, so with ALBEF's two negatives per positive the
    negatives carry two thirds of the weight.
    """
    for name, logits in (("pos_logits", pos_logits), ("neg_logits", neg_logits)):
        if logits.dim() != 2 or logits.size(1) != 2:
            raise ValueError(f"{name} must have shape [N, 2], got {tuple(logits.shape)}")
    logits = torch.cat([pos_logits, neg_logits])
    labels = torch.cat(
        [
            torch.ones(pos_logits.size(0), dtype=torch.long, device=logits.device),
            torch.zeros(neg_logits.size(0), dtype=torch.long, device=logits.device),
        ]
    )
    return F.cross_entropy(logits, labels)


def _check_masking(input_ids: Tensor, attention_mask: Tensor, prob: float) -> None:
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must lie in (0, 1], got {prob}")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must have the same shape"
        )


def _replacement_ids(special: Tensor, mask_id: int, vocab_size: int) -> Tensor:
    """The ids a chosen token may turn into at random: all but the special ids and [MASK]."""
    excluded = torch.cat([special, special.new_tensor([mask_id])])
    replacements = torch.ones(vocab_size, dtype=torch.bool, device=special.device)
    replacements[excluded[(excluded >= 0) & (excluded < vocab_size)]] = False
    replacements = replacements.nonzero().squeeze(1)
    if replacements.numel() == 0:
        raise ValueError(f"a vocabulary of {vocab_size} ids has no ordinary token to draw")
    return replacements


def _corrupt(input_ids: Tensor, chosen: Tensor, mask_id: int, replacements: Tensor,
             generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """BERT's 80/10/10 on the chosen positions: (masked input ids, labels)."""
    device = _draw_device(generator, input_ids)
    kind = torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)
    to_mask = chosen & (kind < MASK_SHARE)
    to_random = chosen & (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
    pick = torch.randint(replacements.numel(), input_ids.shape, generator=generator, device=device)
    random_ids = replacements[pick.to(input_ids.device)]
    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, random_ids, masked)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked, labels


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    prob: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking, token by token: (masked input ids, labels), the inputs left unchanged.

    Each real (attention_mask == 1) token outside `special_ids` is chosen with probability
    `prob`; of the chosen, 80% become `mask_id`, 10% a random id in [0, vocab_size) other than
    the special ids and `mask_id`, and 10% stay. Labels hold the original id at chosen positions
    and IGNORE_INDEX elsewhere. When a batch has a maskable token but the draw chose none, the
    maskable token whose draw came closest is chosen, so the MLM loss is never empty (NaN).
    """
    _check_masking(input_ids, attention_mask, prob)
    special = torch.tensor(list(special_ids), dtype=torch.long, device=input_ids.device)
    replacements = _replacement_ids(special, mask_id, vocab_size)
    if input_ids.numel() == 0:
        return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)

    device = _draw_device(generator, input_ids)
    maskable = (attention_mask == 1) & ~torch.isin(input_ids, special)
    draw = torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)
    chosen = (draw < prob) & maskable
    # The rescue is written without a branch so that it needs no host-device sync.
    closest = draw.masked_fill(~maskable, 2.0).flatten().argmin()
    rescue = torch.zeros_like(chosen).flatten()
    rescue[closest] = maskable.flatten()[closest] & ~chosen.any()
    chosen = chosen | rescue.view_as(chosen)
    return _corrupt(input_ids, chosen, mask_id, replacements, generator)


def mask_whole_words(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    continuation_ids: Sequence[int],
    prob: float,
    max_masks: int,
    span_prob: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """X-VLM's masking (its TextMaskingGenerator, whole words on): (masked input ids, labels).

    A caption with n maskable tokens (real, outside `special_ids`) masks
    min(max_masks, max(1, round(prob * (n + 1)))) of them: X-VLM counts its [CLS] with the
    word pieces. Its maskable positions are visited in random order; each one not yet masked
    brings its whole word (the `continuation_ids` pieces around it), or with probability
    `span_prob` an n-gram of 2 or 3 positions from it, widened to whole words, until the count
    is reached. When the last word passes the count, a random subset of that size stays, so,
    as in X-VLM, a word can then keep some of its pieces. The chosen split 80/10/10 as in
    `mask_tokens`. Every caption with a maskable token gets a masked one, so the MLM loss is
    never empty. The choice runs on the host, caption by caption, as X-VLM's data loader does.
    """
    _check_masking(input_ids, attention_mask, prob)
    if max_masks < 1:
        raise ValueError(f"max_masks must be at least 1, got {max_masks}")
    if not 0.0 <= span_prob <= 1.0:
        raise ValueError(f"span probability must lie in [0, 1], got {span_prob}")
    special = torch.tensor(list(special_ids), dtype=torch.long, device=input_ids.device)
    replacements = _replacement_ids(special, mask_id, vocab_size)
    if input_ids.numel() == 0:
        return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)

    device = _draw_device(generator, input_ids)
    shape = input_ids.shape
    visit_order = torch.rand(shape, generator=generator, device=device)
    span_draw = torch.rand(shape, generator=generator, device=device)
    span_size = torch.randint(min(SPAN_SIZES), max(SPAN_SIZES) + 1, shape, generator=generator,
                              device=device)
    keep_order = torch.rand(shape, generator=generator, device=device)
    maskable = ((attention_mask == 1) & ~torch.isin(input_ids, special)).tolist()
    # A lookup table: isin against the thousands of "##" ids of a BERT vocabulary is slow.
    ids = input_ids.cpu()
    continuing = torch.zeros(max(vocab_size, int(ids.max()) + 1), dtype=torch.bool)
    continuing[torch.tensor(continuation_ids, dtype=torch.long)] = True
    continues = continuing[ids].tolist()
    sizes = torch.where(span_draw < span_prob, span_size, 1).tolist()
    visit_order, keep_order = visit_order.tolist(), keep_order.tolist()
    rows, columns = [], []
    for row, row_maskable in enumerate(maskable):
        count = sum(row_maskable)
        if not count:
            continue
        budget = min(max_masks, max(1, round(prob * (count + 1))))
        chosen = _whole_word_positions(row_maskable, continues[row], budget, visit_order[row],
                                       sizes[row], keep_order[row])
        rows += [row] * len(chosen)
        columns += chosen
    chosen = torch.zeros(shape, dtype=torch.bool)
    chosen[rows, columns] = True
    return _corrupt(input_ids, chosen.to(input_ids.device), mask_id, replacements, generator)


def _whole_word_positions(maskable: list[bool], continues: list[bool], budget: int,
                          visit_order: list[float], sizes: list[int], keep_order: list[float]
                          ) -> list[int]:
    """One caption's masked positions under X-VLM's rule (see `mask_whole_words`); `sizes`
    holds the span each position would start (1: its word alone)."""
    length = len(maskable)
    chosen: set[int] = set()
    for pos in sorted((p for p in range(length) if maskable[p]), key=visit_order.__getitem__):
        if len(chosen) >= budget:
            break
        if pos in chosen:
            continue
        start, end = pos, pos + sizes[pos]
        while start > 0 and continues[start]:
            start -= 1
        while end < length and continues[end]:
            end += 1
        for p in range(start, end):
            if p >= length or not maskable[p]:
                break  # the caption ends ([SEP], padding) or reaches a special token
            chosen.add(p)
    if len(chosen) > budget:
        chosen = set(sorted(chosen, key=keep_order.__getitem__)[:budget])
    return sorted(chosen)


def mask_text(input_ids: Tensor, attention_mask: Tensor, masking: Masking,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """MLM's (masked input ids, labels) under `masking`'s rule."""
    ids = {"mask_id": masking.mask_id, "vocab_size": masking.vocab_size,
           "special_ids": masking.special_ids, "prob": masking.prob, "generator": generator}
    if masking.whole_words:
        return mask_whole_words(input_ids, attention_mask, **ids,
                                continuation_ids=masking.continuation_ids,
                                max_masks=masking.max_masks, span_prob=masking.span_prob)
    return mask_tokens(input_ids, attention_mask, **ids)


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of logits [B, L, V] over the positions whose label is not IGNORE_INDEX."""
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, L, V] and labels [B, L], got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not (labels != IGNORE_INDEX).any():
        raise ValueError(
            "mlm_loss got no masked position (every label is -100); mask with mask_tokens, "
            "which chooses at least one token whenever one is maskable"
        )
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
