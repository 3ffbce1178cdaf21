"""VQA as answer classification: the official VQA accuracy, soft targets from it, the loss.

The accuracy follows the VQA challenge's evaluator (GT-Vision-Lab/VQA, `vqaEval.py`): answers
are normalised when the annotators disagree, and a prediction scores the mean over the
leave-one-out subsets of the annotators of min(#matching / 3, 1). docs/fidelity.md lists
where evlm departs from it (questions with fewer than 3 annotators).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# An answer given by this many of the other annotators counts as fully correct.
AGREEING_ANNOTATORS = 3

# The evaluator's tables, as data. Contractions are looked up after lower-casing, so its
# capitalised keys ("Im", "Ive") never match; they are kept, as in the evaluator.
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")
_CONTRACTIONS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll
somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've
something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've
you'dve you'd've|youll you'll|youre you're|youve you've
"""
CONTRACTIONS = dict(item.split(" ") for line in _CONTRACTIONS.strip().splitlines()
                    for item in line.split("|"))

# A period not followed by a digit goes ("2.5" keeps its point). The evaluator passes
# re.UNICODE (32) where `sub` takes its count, so it removes at most 32 of them.
_PERIOD = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = 32
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")


def _strip_punctuation(text: str) -> str:
    """The evaluator's punctuation rule: a mark beside a space (or any mark in a text with a
    comma between digits) is deleted, any other mark becomes a space; then periods go."""
    out = text
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        spaced = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if spaced or delete_all else " ")
    return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def _words_digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """An answer as the evaluator compares it when annotators disagree: punctuation, then
    lower case, number words as digits, articles dropped, contractions restored."""
    return _words_digits_articles(_strip_punctuation(_clean(text)))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _compared(answer: str, annotators: Sequence[str]) -> tuple[str, list[str]]:
    """The prediction and the annotators' answers as the evaluator compares them: normalised
    only when the annotators disagree (when all agree, nothing is normalised)."""
    given = [_clean(a) for a in annotators]
    answer = _clean(answer)
    if len(set(given)) > 1:
        return normalize_answer(answer), [normalize_answer(a) for a in given]
    return answer, given


def accuracy_of_count(matching: int, annotators: int) -> float:
    """The score of an answer that `matching` of `annotators` gave.

    From 3 annotators on (VQAv2 asks 10), the evaluator's leave-one-out mean of
    min(#matching others / 3, 1): a left-out annotator who gave the answer leaves
    `matching - 1`, any other leaves `matching`. Below 3 no subset can reach agreement, so the
    score is the share of annotators who gave it (one annotator, as in easy-VQA: exact match).
    """
    if annotators == 0:
        return 0.0
    if annotators < AGREEING_ANNOTATORS:
        return matching / annotators
    agree = AGREEING_ANNOTATORS
    left_out_agreeing = matching * min((matching - 1) / agree, 1.0) if matching else 0.0
    left_out_other = (annotators - matching) * min(matching / agree, 1.0)
    return (left_out_agreeing + left_out_other) / annotators


def vqa_accuracy_of(answer: str, annotators: Sequence[str]) -> float:
    """The official accuracy of one predicted `answer` against every annotator's answer."""
    answer, given = _compared(answer, annotators)
    return accuracy_of_count(given.count(answer), len(given))


def answer_scores(annotators: Sequence[str], candidates: Sequence[str]) -> dict[int, float]:
    """{index in `candidates`: the official accuracy of predicting it}, nonzero entries only.

    These are the training targets: what each answer of the answer list would score. No
    annotators (an unlabelled test question) give no scores.
    """
    if not annotators:
        return {}
    normalise = len({_clean(a) for a in annotators}) > 1
    _, given = _compared("", annotators)
    counts = Counter(given)
    out = {}
    for index, candidate in enumerate(candidates):
        key = normalize_answer(candidate) if normalise else _clean(candidate)
        if key in counts:
            out[index] = accuracy_of_count(counts[key], len(given))
    return out


def vqa_report(predicted: Sequence[str], annotators: Sequence[Sequence[str]],
               answer_types: Sequence[str | None]) -> dict:
    """The official accuracy over questions, overall and per answer type (when the data gives
    one: yes/no, number, other)."""
    if not predicted:
        raise ValueError("vqa_report needs at least one question")
    scores = [vqa_accuracy_of(p, a) for p, a in zip(predicted, annotators, strict=True)]
    by_type: dict[str, list[float]] = {}
    for kind, score in zip(answer_types, scores, strict=True):
        if kind is not None:
            by_type.setdefault(kind, []).append(score)
    return {"value": sum(scores) / len(scores),
            "by_answer_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())} or None}


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits against each answer's score, summed over answers and
    averaged over examples (the usual VQA classifier objective). The same objective for every
    batch, whether its rows hold one answer or soft scores."""
    targets = targets.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, targets) * targets.size(-1)


def vqa_soft_ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the answers' scores normalised to sum to one: each answer's
    log-likelihood weighted by its share, as X-VLM and ALBEF weight their answer decoders'.
    A row that scores no answer of the list (all annotators outside it) weighs nothing."""
    targets = targets.to(logits.dtype)
    total = targets.sum(dim=-1, keepdim=True)
    weights = targets / total.clamp_min(torch.finfo(targets.dtype).tiny)
    per_row = -(weights * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return per_row.sum() / (total.squeeze(-1) > 0).sum().clamp_min(1)


# The objectives `data.vqa_loss` names.
VQA_LOSSES = {"bce": vqa_loss, "soft_ce": vqa_soft_ce_loss}


def vqa_example_scores(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example, the target score of the predicted (argmax) answer. With the official
    targets of `answer_scores` that is the official accuracy, up to float16 storage."""
    predicted = logits.argmax(dim=-1, keepdim=True)
    return targets.float().gather(-1, predicted).squeeze(-1)


def vqa_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The mean of `vqa_example_scores`."""
    if logits.size(0) == 0:
        raise ValueError("vqa_accuracy needs at least one example")
    return float(vqa_example_scores(logits, targets).mean().item())


def answer_types_of(annotations: Mapping) -> list[str | None]:
    """The answer type of each question of a split's annotations (None where not given)."""
    return list(annotations.get("answer_type") or [None] * len(annotations["answers"]))
