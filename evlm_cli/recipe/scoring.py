"""The task metric of a model over a whole prepared split, and the fixed batches it is timed on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from evlm_cli.data.loader import PreparedData, PreparedSplit
from evlm_cli.models.generate import beam_search, decode_texts, greedy_decode
from evlm_cli.models.vlm import VLM, TaskLogits, model_inputs
from evlm_cli.tasks import TASKS
from evlm_cli.tasks.caption import caption_metrics
from evlm_cli.tasks.retrieval import METRIC as RETRIEVAL_HEADLINE
from evlm_cli.tasks.retrieval import rerank_top_k, retrieval_metrics
from evlm_cli.tasks.vqa import answer_types_of, vqa_report
from evlm_cli.training.loop import trim_text

# Task logits from (images, input_ids, attention_mask): a PyTorch model or an exported one.
Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.inference_mode()
def predict_forward(forward: Forward, data: PreparedData, split: str, batch_size: int,
                    device: torch.device, scores: Callable[[Tensor, Tensor], Tensor] | None = None
                    ) -> tuple[Tensor, float]:
    """The predicted (argmax) answer index of every row of a split, and the sum over rows of
    `scores(logits, targets)` (0 without `scores`)."""
    predicted, total = [], 0.0
    for batch in data.split(split).batches(batch_size):
        batch = {k: v.to(device) for k, v in trim_text(batch).items()}
        logits = forward(*model_inputs(batch)).to(device)
        predicted.append(logits.argmax(dim=-1).cpu())
        if scores is not None:
            total += scores(logits, batch["targets"]).sum().item()
    return torch.cat(predicted), total


# Why a split without answers has no metric: its predictions are written for a server.
UNSCORED = "not scored: the {split} split has no answers (predictions written for its server)"


def classification_report(forward: Forward, data: PreparedData, split: str, task: str,
                          batch_size: int, device: torch.device) -> dict:
    """{"value", "by_answer_type", "unscored", "predictions"} of a VQA or NLVR2 model on a split.

    VQA is scored by the official evaluator's rules on the annotators' raw answers; a split
    without answers (test-dev) is predicted only: "value" None and "unscored" says why.
    Predictions are the task's results format: VQA `{"question_id", "answer"}` per question
    (what the VQA server takes), NLVR2 `{"question_id": row, "answer": "true" | "false"}`.
    """
    labelled = data.labelled(split)
    annotations = data.annotations(split)
    official = annotations is not None
    predicted, total = predict_forward(
        forward, data, split, batch_size, device,
        TASKS[task].example_scores if labelled and not official else None)
    answers = [data.answers[i] for i in predicted.tolist()]
    ids = (annotations["question_id"] if official
           else data.split(split).question_id.tolist())
    report = {"value": None, "by_answer_type": None, "unscored": None,
              "predictions": [{"question_id": int(q), "answer": a}
                              for q, a in zip(ids, answers, strict=True)]}
    if not labelled:
        return {**report, "unscored": UNSCORED.format(split=split)}
    if official:
        return {**report, **vqa_report(answers, annotations["answers"],
                                       answer_types_of(annotations))}
    return {**report, "value": total / max(len(predicted), 1)}


# The spec's captioning metrics and the keys of `caption_metrics` they read.
CAPTION_METRICS = {"cider": "cider", "bleu": "bleu_4", "meteor": "meteor", "rouge_l": "rouge_l"}


def evaluate_task(model: VLM, data: PreparedData, split: str, task: str, batch_size: int,
                  device: torch.device, k_test: int = 0) -> float:
    """The task metric of a PyTorch model on a whole split (for retrieval and pre-training,
    mean recall, ranked by ITC and re-ranked by ITM over the top `k_test`; for captioning,
    CIDEr of greedy captions)."""
    return evaluate_report(model, data, split, task, batch_size, device, k_test,
                           meteor=False)["value"]


def evaluate_report(model: VLM, data: PreparedData, split: str, task: str, batch_size: int,
                    device: torch.device, k_test: int = 0, *, metric: str | None = None,
                    beam_size: int = 1, max_len: int | None = None, meteor: bool = True,
                    rerank: str = "itm", **caption_search) -> dict:
    """{"value": the headline metric, ...}: retrieval adds each recall (TR/IR@1/5/10) under
    "recall", captioning each caption metric under "scores" (`metric` picks the headline:
    cider, bleu, meteor or rouge_l; captions come from beam search when `beam_size` > 1, and
    `caption_search` holds `generate_captions`'s other keywords). "predictions" holds the
    task's results: VQA and NLVR2 answers (`classification_report`), retrieval rankings,
    captions as `{"image_id": prepared image row, "caption"}`."""
    model.eval().to(device)
    if task == "pretrain" or TASKS[task].contrastive:
        return retrieval_report(model, data.split(split), batch_size, device, k_test, rerank)
    if TASKS[task].generative:
        captions = generate_captions(model, data, split, batch_size, device, beam_size,
                                     max_len, **caption_search)
        scores = caption_scores(data, split, captions, meteor)
        return {"value": scores[CAPTION_METRICS[metric or TASKS[task].metric_name]],
                "scores": scores,
                "predictions": [{"image_id": row, "caption": text}
                                for row, text in sorted(captions.items())]}
    return classification_report(TaskLogits(model, task), data, split, task, batch_size, device)


@torch.inference_mode()
def generate_captions(model: VLM, data: PreparedData, split: str, batch_size: int,
                      device: torch.device, beam_size: int = 1, max_len: int | None = None, *,
                      min_len: int = 0, beam_rule: str = "xvlm",
                      block_special_tokens: bool = False) -> dict[int, str]:
    """A caption for every image of a split with references: {image row: text}, written after
    the prepared prompt and without it.

    `max_len` (tokens after the prompt) defaults to what the prepared text holds; `min_len`
    tokens come before the end token may; `block_special_tokens` forbids every special token
    but the end token; `beam_rule` is `beam_search`'s rule when `beam_size` > 1.
    """
    rows = torch.tensor(sorted(data.references(split)), dtype=torch.long)
    tokenizer = data.tokenizer()
    ids = decoder_ids(data, max_len, min_len=min_len, block_special_tokens=block_special_tokens)
    images = data.split(split)
    captions = {}
    for chunk in rows.split(batch_size):
        pixels = images.images_of(chunk).to(device)
        tokens = (beam_search(model, pixels, beam_size=beam_size, rule=beam_rule, **ids)
                  if beam_size > 1 else greedy_decode(model, pixels, **ids))
        texts = decode_texts(tokens.cpu(), tokenizer, ids["eos_id"], ids["pad_id"])
        captions.update(zip(chunk.tolist(), texts, strict=True))
    return captions


def decoder_ids(data: PreparedData, max_len: int | None = None, *, min_len: int = 0,
                block_special_tokens: bool = False) -> dict:
    """The decoding settings of the prepared data: [CLS] and the prompt begin a caption, [SEP]
    ends it, `max_len` (tokens after the prompt) defaults to what the prepared text holds,
    and with `block_special_tokens` the other special tokens ([PAD], [UNK], [CLS], [MASK])
    are never written."""
    tokenizer = data.tokenizer()
    # Data prepared for other tasks, or with an empty prompt, has no prompt.
    prompt = list(data.meta.get("caption_prompt_ids", []))
    eos_id = tokenizer.sep_token_id
    blocked = ([t for t in data.meta["special_token_ids"] if t != eos_id]
               if block_special_tokens else [])
    return dict(bos_id=tokenizer.cls_token_id, eos_id=eos_id, pad_id=tokenizer.pad_token_id,
                max_len=max_len or data.meta["max_text_len"] - 1 - len(prompt),
                prompt_ids=prompt, min_len=min_len, blocked_ids=blocked)


def caption_scores(data: PreparedData, split: str, captions: dict[int, str],
                   meteor: bool = True) -> dict[str, float]:
    """BLEU, METEOR (unless left out), ROUGE-L and CIDEr of `generate_captions`'s captions
    against every reference of their images."""
    references = data.references(split)
    return caption_metrics(captions, {row: references[row] for row in captions}, meteor=meteor)


# How ITM re-ranks ITC's top k: by the match logit alone (X-VLM, ALBEF, EfficientVLM), or
# by the match logit plus the ITC logit (evlm before; ITC then dominates the order).
RERANK = ("itm", "itm+itc")
# The ranking predictions keep each query's best candidates up to the largest recall@K.
RANKED = 10


@torch.inference_mode()
def retrieval_scores(model: VLM, split: PreparedSplit, batch_size: int, device: torch.device,
                     k_test: int, rerank: str = "itm") -> tuple[Tensor, Tensor, Tensor]:
    """(score_i2t, score_t2i, text_to_image) over a split's images and captions (every caption
    row once).

    Images and captions are encoded once; ITC similarity ranks all of them, and the top
    `k_test` candidates of each query are scored again with ITM on the fused pair (0: ITC
    only), as `rerank` says.
    """
    if rerank not in RERANK:
        raise ValueError(f"rerank must be one of {RERANK}, got {rerank!r}")
    rows = split.image_index
    image_rows, text_to_image = torch.unique(rows, sorted=True, return_inverse=True)
    image_tokens = torch.cat([model.vision(split.images_of(chunk).to(device)).last
                              for chunk in image_rows.split(batch_size)])
    text_tokens, masks = [], []
    # Captions alone: gathering whole batches would also decode every row's image again.
    for ids, mask in zip(split.input_ids.split(batch_size), split.attention_mask.split(batch_size),
                         strict=True):
        ids, mask = ids.long().to(device), mask.long().to(device)
        text_tokens.append(model.encode_text(ids, mask).last)
        masks.append(mask)
    text_tokens, masks = torch.cat(text_tokens), torch.cat(masks)
    sim = model.similarity(image_tokens, text_tokens).float()
    if not k_test:
        return sim.cpu(), sim.t().cpu(), text_to_image.cpu()

    def itm_score(image_index: Tensor, text_index: Tensor) -> Tensor:
        fused = model.fuse(text_tokens[text_index], masks[text_index], image_tokens[image_index])
        match = model.match_logits(fused.last, masks[text_index])[:, 1].float()
        return match + sim[image_index, text_index] if rerank == "itm+itc" else match

    score_i2t, score_t2i = rerank_top_k(sim, k_test, itm_score)
    return score_i2t.cpu(), score_t2i.cpu(), text_to_image.cpu()


def retrieval_recalls(model: VLM, split: PreparedSplit, batch_size: int, device: torch.device,
                      k_test: int, rerank: str = "itm") -> dict[str, float]:
    """TR@K and IR@K over a split's images and captions (`retrieval_scores`)."""
    return retrieval_metrics(*retrieval_scores(model, split, batch_size, device, k_test, rerank))


def retrieval_report(model: VLM, split: PreparedSplit, batch_size: int, device: torch.device,
                     k_test: int, rerank: str = "itm") -> dict:
    """{"value": mean recall, "recall": each recall, "predictions": each query's ranking}.

    The rankings name prepared rows: for each image (its first caption row's image index)
    the best RANKED caption rows, and for each caption row the best RANKED images."""
    score_i2t, score_t2i, text_to_image = retrieval_scores(model, split, batch_size, device,
                                                           k_test, rerank)
    recalls = retrieval_metrics(score_i2t, score_t2i, text_to_image)
    image_rows = torch.unique(split.image_index, sorted=True)
    best_texts = score_i2t.topk(min(RANKED, score_i2t.size(1)), dim=1).indices
    best_images = image_rows[score_t2i.topk(min(RANKED, score_t2i.size(1)), dim=1).indices]
    return {"value": recalls[RETRIEVAL_HEADLINE], "recall": recalls,
            "predictions": {
                "image_to_text": [{"image": int(i), "texts": t}
                                  for i, t in zip(image_rows.tolist(), best_texts.tolist(),
                                                  strict=True)],
                "text_to_image": [{"text": r, "images": i}
                                  for r, i in enumerate(best_images.tolist())]}}


def fixed_batch(data: PreparedData, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first `batch_size` test examples, the same for every model measured."""
    split = data.split("test")
    n = min(batch_size, len(split))
    batch = trim_text(split.gather(torch.arange(n)))
    if n < batch_size:  # tiny smoke data: repeat to the requested size
        reps = -(-batch_size // n)
        batch = {k: v.repeat(reps, *[1] * (v.ndim - 1))[:batch_size] for k, v in batch.items()}
    return model_inputs(batch)
