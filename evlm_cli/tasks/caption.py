"""Image captioning: teacher-forcing targets, the token loss, and COCO caption metrics."""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from torch import Tensor

from evlm_cli.core.errors import DataError

IGNORE = -100  # F.cross_entropy's default ignore_index
BLEU_ORDERS = 4


def lm_labels(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Targets [B, L] for a causal decoder over right-padded `[CLS] w1 .. wn [SEP] pad..` rows.

    Position i learns to predict token i+1 wherever that token is real (mask 1), so [CLS]
    predicts w1 and wn predicts [SEP]. [SEP] itself, padding and the last column are IGNORE.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    labels = torch.full_like(input_ids, IGNORE, dtype=torch.long)
    next_is_real = attention_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(next_is_real, input_ids[:, 1:].long(), IGNORE)
    return labels


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy of `logits` [B, L, V] over the positions `labels` does not IGNORE."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits [B, L, V] and labels [B, L] disagree: "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    # With nothing to average, cross_entropy returns NaN, which would pass for a diverged step.
    if not (labels != IGNORE).any():
        raise ValueError("lm_loss needs at least one labelled position, every label is IGNORE")
    return F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def _check_ids(predictions: Mapping, references: Mapping) -> None:
    if not predictions:
        raise ValueError("caption_metrics needs at least one prediction")
    for image_id in references:
        if image_id not in predictions:
            raise ValueError(f"image id {image_id!r} has references but no prediction")
    for image_id in predictions:
        if image_id not in references:
            raise ValueError(f"image id {image_id!r} has a prediction but no references")
        if not references[image_id]:
            raise ValueError(f"image id {image_id!r} has an empty list of references")


def _tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    # The Java tokenizer reads one caption per line and also breaks lines at \r, \f, \v, \u2028
    # and \u2029, which would silently shift every later caption onto the wrong image; so all
    # whitespace is collapsed to single spaces first.
    lines = {
        image_id: [{"caption": " ".join(caption.split())} for caption in group]
        for image_id, group in captions.items()
    }
    try:
        return ptbtokenizer.PTBTokenizer().tokenize(lines)
    except PermissionError as error:
        # It writes its input to a temporary file next to its jar, inside site-packages.
        raise DataError(
            f"caption metrics write a temporary file in {Path(ptbtokenizer.__file__).parent}: "
            "make that directory writable"
        ) from error


def _close(meteor: Meteor) -> None:
    # Meteor stops its JVM only in __del__, which first takes a lock that a failed
    # compute_score never releases, so garbage collection would then block forever.
    process = meteor.meteor_p
    process.stdin.close()
    process.kill()
    process.wait()
    process.stdout.close()
    process.stderr.close()
    if meteor.lock.locked():
        meteor.lock.release()


def caption_metrics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
    *, meteor: bool = True,
) -> dict[str, float]:
    """COCO caption metrics of one generated caption per image against its references.

    Keys: bleu_1 .. bleu_4, meteor, rouge_l and cider, computed by pycocoevalcap after its PTB
    tokenisation (lower case, punctuation dropped). BLEU is corpus-level with the closest
    reference length; the others are means over images. CIDEr weighs n-grams by their rarity
    among the given references, so it needs a whole test set (one image scores 0). Both
    mappings must hold the same ids. `meteor=False` leaves METEOR out: its JVM takes 10-20 s
    to start, too long for a validation score during training. Raises DataError when Java
    is missing.
    """
    _check_ids(predictions, references)
    if shutil.which("java") is None:
        raise DataError("caption metrics need Java: put a JRE 8 or newer on PATH")
    gts = _tokenize(references)
    res = _tokenize({image_id: [caption] for image_id, caption in predictions.items()})

    bleus, _ = Bleu(BLEU_ORDERS).compute_score(gts, res, verbose=0)  # verbose prints counts
    metrics = {f"bleu_{n}": float(bleu) for n, bleu in enumerate(bleus, start=1)}
    if meteor:
        scorer = Meteor()  # starts a JVM that loads paraphrase tables: seconds and about 1 GB
        try:
            metrics["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _close(scorer)
    metrics["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    metrics["cider"] = float(Cider().compute_score(gts, res)[0])
    return metrics
