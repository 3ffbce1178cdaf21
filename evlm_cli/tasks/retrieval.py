"""Image-text retrieval evaluation: ITC top-k candidates re-ranked by ITM, and recall@K.

The protocol is ALBEF's and X-VLM's: the contrastive similarity picks each query's k best
candidates, the match head rescores only those, and recall@K is read off the rescored matrix.
Recalls are fractions in [0, 1], like our other metrics (the papers print percentages).

Ties are pessimistic: a ground truth ranks behind every other candidate with an equal score, so
a constant scorer earns no credit and the order of the candidates cannot change a result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

METRIC = "r_mean"  # the headline value among retrieval_metrics' keys
RECALL_AT = (1, 5, 10)
# Score of a pair outside a query's top-k: below every rescored pair, tied with the rest.
OUTSIDE_TOP_K = float("-inf")


@torch.no_grad()
def _rerank_rows(
    sim: Tensor, k: int, itm_score: Callable[[Tensor, Tensor], Tensor], rows_are_images: bool
) -> Tensor:
    k = min(k, sim.size(1))
    scores = torch.full_like(sim, OUTSIDE_TOP_K)
    top_k = sim.topk(k, dim=1).indices
    for row, candidates in enumerate(top_k):
        query = torch.full_like(candidates, row)
        pairs = (query, candidates) if rows_are_images else (candidates, query)
        rescored = itm_score(*pairs)
        if rescored.shape != (k,):
            raise ValueError(
                f"itm_score must return one score per pair, shape ({k},), "
                f"got {tuple(rescored.shape)}"
            )
        scores[row, candidates] = rescored.to(scores)
    return scores


def rerank_top_k(
    sim_i2t: Tensor, k: int, itm_score: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """(score_i2t [n_img, n_txt], score_t2i [n_txt, n_img]) after ITM re-ranking of the top k.

    For each image its k most similar texts by `sim_i2t`, and for each text its k most similar
    images, are rescored by `itm_score(image_indices, text_indices)`: two 1-D index tensors of
    equal length in, one score per pair out (e.g. the ITM match logit). It is called once per
    image with min(k, n_txt) pairs, then once per text with min(k, n_img) pairs, under no_grad.
    Every other entry is OUTSIDE_TOP_K (-inf), so it ranks behind the whole top k.
    """
    if sim_i2t.dim() != 2:
        raise ValueError(f"sim_i2t must be [n_img, n_txt], got {tuple(sim_i2t.shape)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    score_i2t = _rerank_rows(sim_i2t, k, itm_score, rows_are_images=True)
    score_t2i = _rerank_rows(sim_i2t.t(), k, itm_score, rows_are_images=False)
    return score_i2t, score_t2i


def _ranks_of_best_truth(scores: Tensor, truth: Tensor) -> Tensor:
    """Per row, 0-based rank of its best-scored true candidate: how many false candidates score
    at least as high (ties count against the truth). Other true candidates never count."""
    best_truth = scores.masked_fill(~truth, float("-inf")).max(dim=1, keepdim=True).values
    return ((scores >= best_truth) & ~truth).sum(dim=1)


def retrieval_metrics(
    score_i2t: Tensor, score_t2i: Tensor, text_to_image: Sequence[int] | Tensor
) -> dict[str, float]:
    """Recall@1/5/10 both ways, as fractions, and their means.

    `text_to_image[t]` is the image of caption t. Text retrieval (tr_r*) ranks the captions for
    each image, which is a hit at K when any of its captions is in the top K. Image retrieval
    (ir_r*) ranks the images for each caption, a hit when its own image is in the top K. Keys:
    tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10, tr_mean, ir_mean, r_mean (mean of the six).
    """
    n_img, n_txt = score_i2t.shape
    if n_img == 0 or n_txt == 0:
        raise ValueError(f"retrieval needs at least one image and one text, got {n_img}, {n_txt}")
    if score_t2i.shape != (n_txt, n_img):
        raise ValueError(
            f"score_t2i must be [n_txt, n_img] = [{n_txt}, {n_img}] to match score_i2t, "
            f"got {tuple(score_t2i.shape)}"
        )
    image_of_text = torch.as_tensor(text_to_image, dtype=torch.long, device=score_i2t.device)
    if image_of_text.shape != (n_txt,):
        raise ValueError(
            f"text_to_image must name one image per text ({n_txt}), got {image_of_text.numel()}"
        )
    if n_txt and not ((image_of_text >= 0) & (image_of_text < n_img)).all():
        raise ValueError(f"text_to_image holds an image index outside [0, {n_img})")
    truth_i2t = image_of_text.unsqueeze(0) == torch.arange(n_img, device=score_i2t.device)[:, None]
    if not truth_i2t.any(dim=1).all():
        uncaptioned = (~truth_i2t.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"images {uncaptioned} have no caption in text_to_image")

    ranks = {
        "tr": _ranks_of_best_truth(score_i2t, truth_i2t),
        "ir": _ranks_of_best_truth(score_t2i, truth_i2t.t().to(score_t2i.device)),
    }
    metrics = {}
    for direction, rank in ranks.items():
        recalls = {f"{direction}_r{at}": float((rank < at).float().mean()) for at in RECALL_AT}
        metrics.update(recalls)
        metrics[f"{direction}_mean"] = sum(recalls.values()) / len(recalls)
    metrics["r_mean"] = (metrics["tr_mean"] + metrics["ir_mean"]) / 2
    return metrics
