"""Vision-language pre-training objectives (ALBEF / X-VLM): ITC, ITM with hard negatives, MLM.

All are pure functions of tensors. Examples are paired by position: row i of a similarity
matrix is the image of example i and column j the text of example j. Several examples may show
one image (COCO has five captions per image); `image_ids` says which, and examples that share
an image id are positives of each other, never negatives (X-VLM's idx-based targets).
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _draw_device(generator: torch.Generator | None, like: Tensor) -> torch.device:
    # Random draws happen where the generator lives (a CPU generator cannot feed a CUDA draw).
    return generator.device if generator is not None else like.device


def negative_probs(sim_i2t: Tensor, image_ids: Tensor, hard_share: float = 1.0) -> Tensor:
    """Each row's distribution over its negatives [B, B]: `hard_share` of the mass as
    softmax(sim) over the negatives (ALBEF's hard negatives), the rest spread evenly over them.

    A negative is an example with a different image id; positives, the example itself
    included, get probability 0. A batch of one image has no negatives (ValueError).
    """
    if not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"hard_share must lie in [0, 1], got {hard_share}")
    positive = _positive_mask(image_ids, _square(sim_i2t))
    negative = ~positive
    if not negative.any(dim=1).all():
        raise ValueError(
            "hard negative mining needs at least two different images in a batch, but every "
            f"example shows image id {image_ids[0].item()}; mix images within each batch"
        )
    # Masking the logits before the softmax keeps the negatives' weights exact even when a
    # positive's similarity is so large that the plain softmax would round the others to 0.
    hard = F.softmax(sim_i2t.detach().float().masked_fill(positive, float("-inf")), dim=1)
    even = negative.float() / negative.sum(dim=1, keepdim=True)
    return hard_share * hard + (1.0 - hard_share) * even


@torch.no_grad()
def sample_hard_negatives(
    sim_i2t: Tensor, image_ids: Tensor, generator: torch.Generator | None = None,
    hard_share: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """ALBEF's hard negative mining: (a negative text per image, a negative image per text).

    Each row draws one index from `negative_probs` of that row (image to text) or column
    (text to image). With `hard_share` 1 every draw is ALBEF's; below 1 some negatives are
    drawn evenly, so ITM also sees easy ones. Once ITC has learnt, hard negatives alone
    differ from the positive in one small detail, and on a small budget ITM never starts
    (easy-VQA pairs: its loss stayed at the constant predictor's until half the negatives
    were even). Both results are int64 tensors of shape [B] with no gradient.
    """
    device = _draw_device(generator, sim_i2t)
    negatives = []
    for rows in (sim_i2t, sim_i2t.t()):
        probs = negative_probs(rows, image_ids, hard_share).to(device)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        negatives.append(drawn.to(sim_i2t.device))
    return negatives[0], negatives[1]


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
    """BERT masking: (masked input ids, labels), the inputs left unchanged.

    Each real (attention_mask == 1) token outside `special_ids` is chosen with probability
    `prob`; of the chosen, 80% become `mask_id`, 10% a random id in [0, vocab_size) other than
    the special ids and `mask_id`, and 10% stay. Labels hold the original id at chosen positions
    and IGNORE_INDEX elsewhere. When a batch has a maskable token but the draw chose none, the
    maskable token whose draw came closest is chosen, so the MLM loss is never empty (NaN).
    """
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"mask probability must lie in (0, 1], got {prob}")
    if input_ids.shape != attention_mask.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must have the same shape"
        )
    special = torch.tensor(list(special_ids), dtype=torch.long, device=input_ids.device)
    excluded = torch.cat([special, special.new_tensor([mask_id])])
    replacements = torch.ones(vocab_size, dtype=torch.bool, device=input_ids.device)
    replacements[excluded[(excluded >= 0) & (excluded < vocab_size)]] = False
    replacements = replacements.nonzero().squeeze(1)
    if replacements.numel() == 0:
        raise ValueError(f"a vocabulary of {vocab_size} ids has no ordinary token to draw")
    if input_ids.numel() == 0:
        return input_ids.clone(), torch.full_like(input_ids, IGNORE_INDEX)

    device = _draw_device(generator, input_ids)

    def uniform() -> Tensor:
        return torch.rand(input_ids.shape, generator=generator, device=device).to(input_ids.device)

    maskable = (attention_mask == 1) & ~torch.isin(input_ids, special)
    draw = uniform()
    chosen = (draw < prob) & maskable
    # The rescue is written without a branch so that it needs no host-device sync.
    closest = draw.masked_fill(~maskable, 2.0).flatten().argmin()
    rescue = torch.zeros_like(chosen).flatten()
    rescue[closest] = maskable.flatten()[closest] & ~chosen.any()
    chosen = chosen | rescue.view_as(chosen)

    kind = uniform()
    to_mask = chosen & (kind < MASK_SHARE)
    to_random = chosen & (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
    pick = torch.randint(replacements.numel(), input_ids.shape, generator=generator, device=device)
    random_ids = replacements[pick.to(input_ids.device)]
    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, random_ids, masked)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)
    return masked, labels


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
