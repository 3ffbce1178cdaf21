"""Pre-training objectives: ITC with shared images, hard negative mining, ITM and BERT masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.tasks.pretrain import (
    IGNORE_INDEX,
    TERMS,
    itc_loss,
    itm_loss,
    mask_tokens,
    mlm_loss,
    negative_probs,
    sample_hard_negatives,
)

PAD, CLS, SEP, MASK = 0, 101, 102, 103
SPECIAL = (PAD, CLS, SEP)
VOCAB = 1000


def test_terms_name_the_three_objectives():
    assert TERMS == ("itc", "itm", "mlm")


# --- ITC ---------------------------------------------------------------------------------------


def test_itc_on_a_2x2_matrix_equals_the_closed_form():
    a, b, c, d = 2.0, 0.5, -1.0, 1.5
    sim = torch.tensor([[a, b], [c, d]])
    # Image rows: -log(e^a / (e^a + e^b)), -log(e^d / (e^c + e^d)); text columns likewise.
    i2t = (math.log(math.exp(a) + math.exp(b)) - a + math.log(math.exp(c) + math.exp(d)) - d) / 2
    t2i = (math.log(math.exp(a) + math.exp(c)) - a + math.log(math.exp(b) + math.exp(d)) - d) / 2
    assert itc_loss(sim, torch.tensor([0, 1])).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_itc_prefers_the_matching_pairs():
    generator = torch.Generator().manual_seed(0)
    sim = torch.randn(8, 8, generator=generator) + 5 * torch.eye(8)
    image_ids = torch.arange(8)
    shuffled = sim[:, torch.randperm(8, generator=generator)]
    assert itc_loss(sim, image_ids) < itc_loss(shuffled, image_ids) - 1.0


def test_itc_counts_captions_of_one_image_as_positives():
    sim = torch.tensor([[2.0, 2.0, 0.0], [2.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    # Examples 0 and 1 show image 7: rows 0 and 1 target [1/2, 1/2, 0], so each loses
    # log(2e^2 + 1) - 2; row 2 loses log(e^2 + 2) - 2. The matrix is symmetric: t2i is the same.
    expected = (2 * (math.log(2 * math.exp(2) + 1) - 2) + math.log(math.exp(2) + 2) - 2) / 3
    loss = itc_loss(sim, torch.tensor([7, 7, 3]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # The gradient pulls the two captions of image 7 together; as distinct images it would push
    # them apart.
    for image_ids, direction in ((torch.tensor([7, 7, 3]), -1), (torch.arange(3), 1)):
        leaf = sim.clone().requires_grad_(True)
        itc_loss(leaf, image_ids).backward()
        assert torch.sign(leaf.grad[0, 1]) == direction


def test_itc_gradient_flows_and_bad_shapes_are_reported():
    sim = torch.randn(3, 3, requires_grad=True)
    itc_loss(sim, torch.tensor([0, 1, 1])).backward()
    assert sim.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image_ids must have shape"):
        itc_loss(torch.zeros(3, 3), torch.arange(2))
    with pytest.raises(ValueError, match="square"):
        itc_loss(torch.zeros(3, 2), torch.arange(3))


# --- ITM hard negatives -------------------------------------------------------------------------


def test_hard_negatives_never_share_the_image():
    generator = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3])  # several captions per image
    # Strong similarity inside each image's group: the plain softmax would pick positives.
    sim = torch.randn(7, 7, generator=generator) + 20 * (image_ids[:, None] == image_ids)
    sim.requires_grad_(True)
    for _ in range(300):
        texts, images = sample_hard_negatives(sim, image_ids, generator)
        assert texts.dtype == images.dtype == torch.long and not texts.requires_grad
        assert (image_ids[texts] != image_ids).all()
        assert (image_ids[images] != image_ids).all()


def test_hard_negatives_follow_the_similarity():
    generator = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 3.0  # image 0 resembles text 2 (and text 2 resembles image 0)
    draws = 3000
    text_counts, image_counts = torch.zeros(4), torch.zeros(4)
    for _ in range(draws):
        texts, images = sample_hard_negatives(sim, torch.arange(4), generator)
        text_counts[texts[0]] += 1
        image_counts[images[2]] += 1
    # softmax over the negatives {1: 0, 2: 3, 3: 0} of row 0, and {0: 3, 1: 0, 3: 0} of column 2
    hardest = math.exp(3) / (math.exp(3) + 2)
    assert text_counts[0] == 0 and image_counts[2] == 0
    assert text_counts[2] / draws == pytest.approx(hardest, abs=0.02)
    assert image_counts[0] / draws == pytest.approx(hardest, abs=0.02)
    assert text_counts[1] / draws == pytest.approx((1 - hardest) / 2, abs=0.02)


def test_a_share_of_even_negatives_mixes_in_by_hand():
    sim = torch.zeros(3, 3)
    sim[0, 1] = math.log(4.0)  # row 0's negatives 1 and 2 weigh 4 : 1 under the softmax
    image_ids = torch.tensor([0, 1, 2])
    probs = negative_probs(sim, image_ids, hard_share=0.5)
    # half of (0.8, 0.2) plus half of (0.5, 0.5)
    assert probs[0].tolist() == pytest.approx([0.0, 0.65, 0.35])
    assert negative_probs(sim, image_ids, hard_share=0.0)[0].tolist() == pytest.approx(
        [0.0, 0.5, 0.5])
    assert negative_probs(sim, image_ids)[0].tolist() == pytest.approx([0.0, 0.8, 0.2])
    # Positives stay impossible whatever the share: two captions of image 7.
    probs = negative_probs(torch.randn(4, 4), torch.tensor([7, 7, 8, 9]), hard_share=0.3)
    assert probs[0, :2].tolist() == [0.0, 0.0] and probs[1, :2].tolist() == [0.0, 0.0]
    assert probs.sum(dim=1).tolist() == pytest.approx([1.0] * 4)
    with pytest.raises(ValueError, match="hard_share"):
        negative_probs(sim, image_ids, hard_share=1.5)


def test_even_draws_follow_the_mixed_distribution():
    generator = torch.Generator().manual_seed(0)
    sim = torch.zeros(4, 4)
    sim[0, 2] = 8.0  # alone, the hard draw would almost always pick text 2
    draws, counts = 3000, torch.zeros(4)
    for _ in range(draws):
        texts, _ = sample_hard_negatives(sim, torch.arange(4), generator, hard_share=0.25)
        counts[texts[0]] += 1
    expected = negative_probs(sim, torch.arange(4), hard_share=0.25)[0]
    assert expected[1] == pytest.approx(0.75 / 3, abs=1e-3)
    assert (counts / draws).tolist() == pytest.approx(expected.tolist(), abs=0.025)


def test_hard_negatives_are_reproducible_with_a_generator():
    sim = torch.randn(5, 5)
    first = sample_hard_negatives(sim, torch.arange(5), torch.Generator().manual_seed(3))
    second = sample_hard_negatives(sim, torch.arange(5), torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_a_batch_of_one_image_has_no_negative():
    with pytest.raises(ValueError, match="at least two different images"):
        sample_hard_negatives(torch.randn(3, 3), torch.tensor([4, 4, 4]))


# --- ITM loss -----------------------------------------------------------------------------------


def test_itm_loss_labels_positives_one_and_negatives_zero_over_all_rows():
    pos = torch.tensor([[-1.0, 2.0]])
    neg = torch.tensor([[0.5, 0.0], [3.0, -2.0]])
    # -log p(match) for the positive, -log p(no match) for each negative, mean over 3 rows.
    expected = (
        -F.log_softmax(pos, dim=1)[0, 1]
        - F.log_softmax(neg, dim=1)[0, 0]
        - F.log_softmax(neg, dim=1)[1, 0]
    ) / 3
    assert itm_loss(pos, neg).item() == pytest.approx(expected.item(), rel=1e-6)
    assert itm_loss(pos, neg) < itm_loss(neg, pos)
    with pytest.raises(ValueError, match="pos_logits must have shape"):
        itm_loss(torch.zeros(2, 3), neg)


# --- MLM ----------------------------------------------------------------------------------------


def padded_batch(rows, length, generator):
    """[CLS] words [SEP] [PAD]...: each row's word count drawn in [1, length - 2]."""
    input_ids = torch.full((rows, length), PAD)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    words = torch.randint(1, length - 1, (rows,), generator=generator)
    for row, count in enumerate(words.tolist()):
        input_ids[row, 0] = CLS
        input_ids[row, 1 : count + 1] = torch.randint(200, VOCAB, (count,), generator=generator)
        input_ids[row, count + 1] = SEP
        attention_mask[row, : count + 2] = 1
    return input_ids, attention_mask


def mask(input_ids, attention_mask, prob=0.15, seed=0):
    return mask_tokens(
        input_ids,
        attention_mask,
        mask_id=MASK,
        vocab_size=VOCAB,
        special_ids=SPECIAL,
        prob=prob,
        generator=torch.Generator().manual_seed(seed),
    )


def test_masking_chooses_real_words_only_and_splits_80_10_10():
    input_ids, attention_mask = padded_batch(2000, 32, torch.Generator().manual_seed(1))
    original = input_ids.clone()
    masked, labels = mask(input_ids, attention_mask)
    assert torch.equal(input_ids, original)  # inputs are not modified

    chosen = labels != IGNORE_INDEX
    words = (attention_mask == 1) & ~torch.isin(input_ids, torch.tensor(SPECIAL))
    assert not (chosen & ~words).any()  # never [CLS], [SEP] or padding
    assert torch.equal(masked[~chosen], input_ids[~chosen])
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert chosen.sum() / words.sum() == pytest.approx(0.15, abs=0.01)

    as_mask = masked[chosen] == MASK
    kept = masked[chosen] == input_ids[chosen]
    replaced = ~as_mask & ~kept
    total = chosen.sum()
    assert as_mask.sum() / total == pytest.approx(0.8, abs=0.02)
    assert replaced.sum() / total == pytest.approx(0.1, abs=0.015)
    assert kept.sum() / total == pytest.approx(0.1, abs=0.015)
    random_ids = masked[chosen][replaced]
    assert not torch.isin(random_ids, torch.tensor([*SPECIAL, MASK])).any()
    assert ((random_ids >= 0) & (random_ids < VOCAB)).all()


def test_masking_always_chooses_one_token_when_it_can():
    input_ids = torch.tensor([[CLS, 500, SEP, PAD], [CLS, SEP, PAD, PAD]])
    attention_mask = (input_ids != PAD).long()
    for seed in range(20):
        _, labels = mask(input_ids, attention_mask, prob=1e-6, seed=seed)
        assert (labels != IGNORE_INDEX).nonzero().tolist() == [[0, 1]]
    only_special = torch.tensor([[CLS, SEP, PAD]])
    masked, labels = mask(only_special, (only_special != PAD).long(), prob=0.5)
    assert (labels == IGNORE_INDEX).all() and torch.equal(masked, only_special)


def test_masking_is_reproducible_with_a_generator():
    input_ids, attention_mask = padded_batch(8, 16, torch.Generator().manual_seed(2))
    first, second = mask(input_ids, attention_mask, seed=5), mask(input_ids, attention_mask, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    with pytest.raises(ValueError, match="mask probability"):
        mask(input_ids, attention_mask, prob=0.0)


def test_mlm_loss_ignores_unmasked_positions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 1], labels[1, 3] = 4, 0
    expected = -(F.log_softmax(logits[0, 1], dim=0)[4] + F.log_softmax(logits[1, 3], dim=0)[0]) / 2
    assert mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)

    changed = logits.clone()
    unmasked = labels == IGNORE_INDEX
    changed[unmasked] = 100 * torch.randn(int(unmasked.sum()), 7, generator=generator)
    assert mlm_loss(changed, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mlm_loss_without_a_masked_position_is_an_error():
    with pytest.raises(ValueError, match="no masked position"):
        mlm_loss(torch.randn(1, 3, 7), torch.full((1, 3), IGNORE_INDEX))
