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
from evlm_cli.training.loop import trim_text

# Task logits from (images, input_ids, attention_mask): a PyTorch model or an exported one.
Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


@torch.inference_mode()
def evaluate_forward(forward: Forward, data: PreparedData, split: str, task: str,
                     batch_size: int, device: torch.device) -> float:
    """The task metric of `forward` on a whole split (VQA accuracy for VQA)."""
    scores, count = 0.0, 0
    for batch in data.split(split).batches(batch_size):
        batch = {k: v.to(device) for k, v in trim_text(batch).items()}
        logits = forward(*model_inputs(batch)).to(device)
        scores += TASKS[task].example_scores(logits, batch["targets"]).sum().item()
        count += batch["targets"].shape[0]
    return scores / max(count, 1)


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
                    beam_size: int = 1, max_len: int | None = None, meteor: bool = True) -> dict:
    """{"value": the headline metric, ...}: retrieval adds each recall (TR/IR@1/5/10) under
    "recall", captioning each caption metric under "scores" (`metric` picks the headline:
    cider, bleu, meteor or rouge_l; captions come from beam search when `beam_size` > 1)."""
    model.eval().to(device)
    if task == "pretrain" or TASKS[task].contrastive:
        recalls = retrieval_recalls(model, data.split(split), batch_size, device, k_test)
        return {"value": recalls[RETRIEVAL_HEADLINE], "recall": recalls}
    if TASKS[task].generative:
        scores = caption_scores(model, data, split, batch_size, device, beam_size, max_len,
                                meteor)
        return {"value": scores[CAPTION_METRICS[metric or TASKS[task].metric_name]],
                "scores": scores}
    return {"value": evaluate_forward(TaskLogits(model, task), data, split, task, batch_size,
                                      device)}


@torch.inference_mode()
def generate_captions(model: VLM, data: PreparedData, split: str, batch_size: int,
                      device: torch.device, beam_size: int = 1, max_len: int | None = None
                      ) -> dict[int, str]:
    """A caption for every image of a split with references: {image row: text}.

    `max_len` (tokens after the begin token) defaults to what the prepared text holds.
    """
    rows = torch.tensor(sorted(data.references(split)), dtype=torch.long)
    tokenizer = data.tokenizer()
    ids = decoder_ids(data, max_len)
    images = data.split(split)
    captions = {}
    for chunk in rows.split(batch_size):
        pixels = images.images_of(chunk).to(device)
        tokens = (beam_search(model, pixels, beam_size=beam_size, **ids) if beam_size > 1
                  else greedy_decode(model, pixels, **ids))
        texts = decode_texts(tokens.cpu(), tokenizer, ids["eos_id"], ids["pad_id"])
        captions.update(zip(chunk.tolist(), texts, strict=True))
    return captions


def decoder_ids(data: PreparedData, max_len: int | None = None) -> dict:
    """The decoding settings of the prepared tokenizer: [CLS] begins a caption, [SEP] ends it,
    and `max_len` (tokens after the begin token) defaults to what the prepared text holds."""
    tokenizer = data.tokenizer()
    return dict(bos_id=tokenizer.cls_token_id, eos_id=tokenizer.sep_token_id,
                pad_id=tokenizer.pad_token_id, max_len=max_len or data.meta["max_text_len"] - 1)


def caption_scores(model: VLM, data: PreparedData, split: str, batch_size: int,
                   device: torch.device, beam_size: int = 1, max_len: int | None = None,
                   meteor: bool = True) -> dict[str, float]:
    """BLEU, METEOR (unless left out), ROUGE-L and CIDEr of the model's captions against
    every reference of their images."""
    captions = generate_captions(model, data, split, batch_size, device, beam_size, max_len)
    references = data.references(split)
    return caption_metrics(captions, {row: references[row] for row in captions}, meteor=meteor)


@torch.inference_mode()
def retrieval_recalls(model: VLM, split: PreparedSplit, batch_size: int, device: torch.device,
                      k_test: int) -> dict[str, float]:
    """TR@K and IR@K over a split's images and captions (every caption row once).

    Images and captions are encoded once; ITC similarity ranks all of them, and the top
    `k_test` candidates of each query are scored again with ITM on the fused pair (0: ITC only).
    """
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
    if k_test:
        # The match logit plus the ITC similarity (as BLIP re-ranks; X-VLM uses the match logit
        # alone): a weak ITM then refines ITC's order instead of shuffling it.
        def itm_score(image_index: Tensor, text_index: Tensor) -> Tensor:
            fused = model.fuse(text_tokens[text_index], masks[text_index],
                               image_tokens[image_index])
            match = model.match_logits(fused.last, masks[text_index])[:, 1].float()
            return match + sim[image_index, text_index]
        score_i2t, score_t2i = rerank_top_k(sim, k_test, itm_score)
    else:
        score_i2t, score_t2i = sim, sim.t()
    return retrieval_metrics(score_i2t.cpu(), score_t2i.cpu(), text_to_image.cpu())


def fixed_batch(data: PreparedData, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first `batch_size` test examples, the same for every model measured."""
    split = data.split("test")
    n = min(batch_size, len(split))
    batch = trim_text(split.gather(torch.arange(n)))
    if n < batch_size:  # tiny smoke data: repeat to the requested size
        reps = -(-batch_size // n)
        batch = {k: v.repeat(reps, *[1] * (v.ndim - 1))[:batch_size] for k, v in batch.items()}
    return model_inputs(batch)
