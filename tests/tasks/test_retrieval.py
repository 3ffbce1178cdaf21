"""Retrieval recall@K against hand-worked ranks, before and after ITM re-ranking of the top k."""

import math

import pytest
import torch

from evlm_cli.tasks.retrieval import METRIC, rerank_top_k, retrieval_metrics

# Four images, eight captions: captions 2i and 2i+1 describe image i.
TEXT_TO_IMAGE = [0, 0, 1, 1, 2, 2, 3, 3]

# ITC similarity, rows = images, columns = captions c0..c7. Ground truth marked [ ].
SIM = torch.tensor(
    [
        # c0    c1    c2    c3    c4    c5    c6    c7
        [0.9, 0.3, 0.1, 0.2, 0.4, 0.0, 0.5, 0.6],  # img0: [c0 .9] c1 .3
        [0.2, 0.8, 0.7, 0.1, 0.9, 0.3, 0.0, 0.4],  # img1: [c2 .7] c3 .1
        [0.7, 0.6, 0.5, 0.9, 0.4, 0.3, 0.8, 0.2],  # img2: [c4 .4] c5 .3
        [0.1, 0.5, 0.7, 0.3, 0.2, 0.7, 0.8, 0.4],  # img3: [c6 .8] c7 .4
    ]
)

# Text retrieval, rank (0-based) of each image's best caption = wrong captions scoring >= it:
#   img0: best c0 .9, nothing higher                          -> 0
#   img1: best c2 .7, wrong c4 .9, c1 .8                       -> 2
#   img2: best c4 .4, wrong c3 .9, c6 .8, c0 .7, c1 .6, c2 .5  -> 5
#   img3: best c6 .8, nothing higher                          -> 0
#   TR@1 = 2/4, TR@5 = 3/4, TR@10 = 4/4
# Image retrieval, per caption the column's images scoring >= its own (ties count against it):
#   c0 [.9 .2 .7 .1] own img0 .9 -> 0     c1 [.3 .8 .6 .5] own img0 .3 -> 3
#   c2 [.1 .7 .5 .7] own img1 .7 -> 1 (tie with img3)
#   c3 [.2 .1 .9 .3] own img1 .1 -> 3     c4 [.4 .9 .4 .2] own img2 .4 -> 2 (img1, tie img0)
#   c5 [.0 .3 .3 .7] own img2 .3 -> 2     c6 [.5 .0 .8 .8] own img3 .8 -> 1 (tie with img2)
#   c7 [.6 .4 .2 .4] own img3 .4 -> 2 (img0, tie img1)
#   IR@1 = 1/8 (c0 only), IR@5 = IR@10 = 8/8 (four images)
ITC_ONLY = {
    "tr_r1": 0.5,
    "tr_r5": 0.75,
    "tr_r10": 1.0,
    "ir_r1": 0.125,
    "ir_r5": 1.0,
    "ir_r10": 1.0,
    "tr_mean": 2.25 / 3,
    "ir_mean": 2.125 / 3,
    "r_mean": 4.375 / 6,
}

# A fake ITM head: the score of (image i, caption t) is ITM_TABLE[i][t].
ITM_TABLE = torch.tensor(
    [
        # c0  c1  c2  c3  c4   c5 c6 c7
        [5.0, 50, 0, 0, 1, 0, 2, 8],  # (img0, c1) = 50 lies in no top 3: it must never count
        [1.0, 3, 9, 0, 4, 2, 0, 6],
        [2.0, 0, 1, 7, 100, 1, 6, 0],  # (img2, c4) = 100 is in c4's top 3 but not img2's
        [0.0, 0, 3, 0, 0, 9, 7, 5],
    ]
)
K = 3
# Text retrieval with k = 3, each image's top 3 captions by SIM rescored by the table:
#   img0: c0 .9, c7 .6, c6 .5 -> ITM c7 8, [c0 5], c6 2       -> 1
#   img1: c4 .9, c1 .8, c2 .7 -> ITM [c2 9], c4 4, c1 3       -> 0
#   img2: c3 .9, c6 .8, c0 .7 -> truths c4, c5 left at -inf, tied with the three other
#         -inf captions, behind the three rescored ones (c4's 100 is never looked at) -> 6
#   img3: c6 .8, c2 .7, c5 .7 -> ITM c5 9, [c6 7], c2 3       -> 1
#   TR@1 = 1/4, TR@5 = 3/4, TR@10 = 4/4
# Image retrieval with k = 3, each caption's top 3 images by SIM rescored by the table:
#   c0: img0 .9, img2 .7, img1 .2 -> ITM [img0 5], img2 2, img1 1   -> 0
#   c1: img1, img2, img3; own img0 outside, -inf                   -> 3
#   c2: img1 .7, img3 .7, img2 .5 -> ITM [img1 9], img3 3, img2 1   -> 0
#   c3: img2, img3, img0; own img1 outside                         -> 3
#   c4: img1 .9, img0 .4, img2 .4 -> ITM [img2 100], img1 4, img0 1 -> 0 (was 2)
#   c5: img3 .7, img1 .3, img2 .3 -> ITM img3 9, img1 2, [img2 1]   -> 2
#   c6: img2 .8, img3 .8, img0 .5 -> ITM [img3 7], img2 6, img0 2   -> 0 (was 1)
#   c7: img0 .6, img1 .4, img3 .4 -> ITM img0 8, img1 6, [img3 5]   -> 2
#   IR@1 = 4/8, IR@5 = IR@10 = 8/8
RERANKED = {
    "tr_r1": 0.25,
    "tr_r5": 0.75,
    "tr_r10": 1.0,
    "ir_r1": 0.5,
    "ir_r5": 1.0,
    "ir_r10": 1.0,
    "tr_mean": 2.0 / 3,
    "ir_mean": 2.5 / 3,
    "r_mean": 0.75,
}


class FakeItm:
    """Scores pairs from ITM_TABLE and records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, image_indices, text_indices):
        assert image_indices.shape == text_indices.shape and image_indices.dim() == 1
        self.calls.append((image_indices.tolist(), text_indices.tolist()))
        return ITM_TABLE[image_indices, text_indices]

    def pairs(self):
        return {pair for images, texts in self.calls for pair in zip(images, texts, strict=True)}


def assert_metrics(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(actual[key], value, abs_tol=1e-9), (key, actual[key], value)


def test_itc_only_metrics_match_the_hand_computation():
    assert_metrics(retrieval_metrics(SIM, SIM.t(), TEXT_TO_IMAGE), ITC_ONLY)
    assert METRIC in ITC_ONLY


def test_reranked_metrics_match_the_hand_computation():
    itm = FakeItm()
    score_i2t, score_t2i = rerank_top_k(SIM, K, itm)
    assert_metrics(retrieval_metrics(score_i2t, score_t2i, torch.tensor(TEXT_TO_IMAGE)), RERANKED)


def test_rerank_scores_only_the_top_k_once_per_query():
    itm = FakeItm()
    score_i2t, score_t2i = rerank_top_k(SIM, K, itm)
    # One call per image, then one per caption, each with k pairs.
    assert [len(images) for images, _ in itm.calls] == [K] * (4 + 8)
    assert itm.calls[1] == ([1, 1, 1], [4, 1, 2])  # img1's captions in ITC order
    assert (0, 1) not in itm.pairs()
    assert score_i2t[0].tolist() == [5, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf, 2, 8]
    assert score_t2i[4].tolist() == [1, 4, 100, -math.inf]
    # (img2, c4) scores 100 for caption c4 but stays outside image 2's top 3.
    assert score_i2t[2, 4] == -math.inf
    for scores in (score_i2t, score_t2i):
        inside = scores.isfinite()
        assert (inside.sum(dim=1) == K).all()
        lowest_inside = scores.masked_fill(~inside, math.inf).min(dim=1).values
        highest_outside = scores.masked_fill(inside, -math.inf).max(dim=1).values
        assert (highest_outside < lowest_inside).all()


def test_k_beyond_the_candidates_rescores_every_pair():
    itm = FakeItm()
    score_i2t, score_t2i = rerank_top_k(SIM, 100, itm)
    assert torch.equal(score_i2t, ITM_TABLE)
    assert torch.equal(score_t2i, ITM_TABLE.t())
    assert [len(images) for images, _ in itm.calls] == [8] * 4 + [4] * 8


def test_ties_rank_the_truth_behind_other_candidates():
    # Image 0 ties its caption c0 with c2 (image 1's): pessimistic, so no hit at 1.
    # Caption c2 ties image 1 with image 0: likewise no hit. Tied truths do not hurt each other.
    scores = torch.tensor([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])
    metrics = retrieval_metrics(scores, scores.t(), [0, 1, 1])
    # TR: img0 -> 1 (tied with c2), img1 -> 0. IR: c0 -> 0, c1 -> 0, c2 -> 1 (tied with img0).
    assert metrics["tr_r1"] == 0.5
    assert metrics["ir_r1"] == pytest.approx(2 / 3)
    both_true = torch.tensor([[3.0, 3.0, 0.0], [0.0, 0.0, 1.0]])
    assert retrieval_metrics(both_true, both_true.t(), [0, 0, 1])["tr_r1"] == 1.0
    constant = torch.zeros(3, 3)
    assert retrieval_metrics(constant, constant, [0, 1, 2])["r_mean"] == pytest.approx(
        (0 + 1 + 1) / 3
    )  # every truth ranks last of three: a miss at 1, a hit at 5 and 10


def test_recall_at_10_misses_when_eleven_others_score_higher():
    # Twelve images, one caption each, every true pair scoring lowest in its row and column.
    scores = 1.0 - torch.eye(12)
    metrics = retrieval_metrics(scores, scores.t(), list(range(12)))
    assert metrics["tr_r10"] == 0.0 and metrics["ir_r10"] == 0.0 and metrics["r_mean"] == 0.0


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="images \\[1\\] have no caption"):
        retrieval_metrics(torch.zeros(2, 2), torch.zeros(2, 2), [0, 0])
    with pytest.raises(ValueError, match="score_t2i must be"):
        retrieval_metrics(torch.zeros(2, 3), torch.zeros(2, 3), [0, 1, 1])
    with pytest.raises(ValueError, match="one score per pair"):
        rerank_top_k(SIM, 2, lambda images, texts: torch.zeros(1))
