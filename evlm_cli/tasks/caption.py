"""Image captioning: the prompt, teacher-forcing targets, the token loss, and COCO caption metrics.

As in X-VLM, every caption may begin with a fixed prompt ("a picture of "): it is prepended to
the training captions, the loss never asks for it, and generation starts from it and drops it.
"""

from __future__ import annotations

import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
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


def lm_labels(input_ids: Tensor, attention_mask: Tensor, prompt_length: int = 0) -> Tensor:
    """Targets [B, L] for a causal decoder over right-padded `[CLS] p1 .. pP w1 .. wn [SEP] pad..`
    rows, whose first `prompt_length` tokens after [CLS] are the prompt.

    Position i learns to predict token i+1 wherever that token is real (mask 1) and not part of
    the prompt, so the prompt's last token (or [CLS]) predicts w1 and wn predicts [SEP]. The
    prompt is given at generation, never generated, so like X-VLM the loss skips it. [SEP]
    itself, padding and the last column are IGNORE.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and attention_mask must both be [B, L], got "
            f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
        )
    if not 0 <= prompt_length < input_ids.shape[1] - 1:
        raise ValueError(f"a prompt of {prompt_length} tokens leaves no caption token in rows "
                         f"of {input_ids.shape[1]}")
    labels = torch.full_like(input_ids, IGNORE, dtype=torch.long)
    next_is_real = attention_mask[:, 1:].bool()
    labels[:, :-1] = torch.where(next_is_real, input_ids[:, 1:].long(), IGNORE)
    labels[:, :prompt_length] = IGNORE
    return labels


def lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy of `logits` [B, L, V] over the positions `labels` does not IGNORE.

    With `label_smoothing` e, each target is (1 - e) on the label plus e spread evenly over the
    vocabulary (torch's definition; X-VLM's own loss gives the label 1 - e without its share of
    the spread, a difference of e / V of the plain cross-entropy).
    """
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


@dataclass(frozen=True)
class CaptionLoss:
    """The captioning task's targets and loss for one prepared dataset and spec: the prepared
    prompt's length (`prompt_ids`), and the spec's label smoothing."""

    prompt_length: int
    label_smoothing: float

    def targets(self, batch: Mapping[str, Tensor]) -> Tensor:
        return lm_labels(batch["input_ids"], batch["attention_mask"], self.prompt_length)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return lm_loss(logits, labels, self.label_smoothing)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's tokens as they begin a prompted caption, after [CLS] and without [SEP]."""
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def check_prompted(input_ids: Tensor, bos_id: int, prompt: Sequence[int], source: str) -> None:
    """Raise DataError unless every row of `input_ids` [N, L] begins with [CLS] and `prompt`.

    A prompt that ends inside a word ("a picture of" without its space) tokenises differently
    once a caption follows it, and the loss and generation would then disagree with the data.
    """
    given = torch.tensor([bos_id, *prompt], dtype=input_ids.dtype)
    if input_ids.shape[1] < len(given) + 1:
        raise DataError(f"{source}: a text length of {input_ids.shape[1]} tokens leaves no room "
                        f"for a caption after the {len(prompt)}-token prompt")
    wrong = (input_ids[:, : len(given)] != given).any(1).nonzero()
    if len(wrong):
        raise DataError(f"{source}: {len(wrong)} captions do not begin with the prompt's tokens "
                        f"(row {int(wrong[0])} first); a prompt must end where a word ends, "
                        "usually with a space")


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
