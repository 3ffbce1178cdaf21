"""Pre-training objectives: ITC with shared images, hard negative mining, ITM and BERT masking."""

import math

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.data.tokenizer import train_wordpiece
from evlm_cli.tasks.pretrain import (
    IGNORE_INDEX,
    TERMS,
    Masking,
    assignment_draws,
    continuation_ids,
    global_batch,
    itc_loss,
    itm_loss,
    mask_text,
    mask_tokens,
    mask_whole_words,
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


def test_one_process_contrasts_its_own_batch():
    """Outside a process group the global batch is this process's (2 processes: tests/test_distributed.py)."""
    image_cls, text_cls, image_ids = torch.randn(3, 1, 4), torch.randn(3, 1, 6), torch.arange(3)
    gathered = global_batch(image_cls, text_cls, image_ids)
    assert all(a is b for a, b in zip(gathered, (image_cls, text_cls, image_ids), strict=True))


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


def xvlm_weights(sim, image_ids, floor):
    """X-VLM's get_matching_loss weights, normalised as torch.multinomial reads them."""
    weights = F.softmax(sim.double(), dim=1) + floor
    weights = weights.masked_fill(image_ids[:, None] == image_ids[None, :], 0.0)
    return weights / weights.sum(dim=1, keepdim=True)


def test_the_floor_on_the_weights_matches_x_vlm_by_hand():
    sim = torch.tensor([[5.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 3.0, 3.0]])
    image_ids = torch.arange(3)
    # row 0 by hand: softmax over the whole row, 1e-5 on each weight, the positive dropped
    z = math.exp(5) + math.exp(1) + 1
    w1, w2 = math.exp(1) / z + 1e-5, 1 / z + 1e-5
    probs = negative_probs(sim, image_ids, floor=1e-5)
    assert probs[0].tolist() == pytest.approx([0.0, w1 / (w1 + w2), w2 / (w1 + w2)], rel=1e-6)
    # the same as X-VLM's arithmetic on every row, shared images included
    sim, image_ids = 4 * torch.randn(6, 6), torch.tensor([0, 0, 1, 2, 2, 3])
    for floor in (1e-5, 1e-2):
        assert torch.allclose(negative_probs(sim, image_ids, floor=floor).double(),
                              xvlm_weights(sim, image_ids, floor), atol=1e-6)
    # without a floor: the softmax over the negatives alone, as before
    assert torch.allclose(negative_probs(sim, image_ids, floor=0.0).double(),
                          xvlm_weights(sim, image_ids, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match="floor"):
        negative_probs(sim, image_ids, floor=-1.0)


def test_the_floor_makes_a_confident_row_draw_evenly():
    # ITC sure of the pair: the softmax leaves the negatives e^-28 of the row, which the
    # floor outweighs; without it text 2 stays the hardest by far
    sim = torch.tensor([[30.0, 0.0, 2.0], [0.0, 30.0, 0.0], [0.0, 0.0, 30.0]])
    image_ids = torch.arange(3)
    without = negative_probs(sim, image_ids)[0]
    assert without[2] == pytest.approx(math.exp(2) / (1 + math.exp(2)), rel=1e-6)
    floored = negative_probs(sim, image_ids, floor=1e-5)[0]
    assert floored[1] == pytest.approx(0.5, abs=1e-6) and floored[2] == pytest.approx(0.5, abs=1e-6)
    # with half the draws even already (hard_share 0.5), the floor acts on the other half
    mixed = negative_probs(sim, image_ids, hard_share=0.5, floor=1e-5)[0]
    assert mixed.tolist() == pytest.approx([0.0, 0.5, 0.5], abs=1e-6)
    # and the draws follow it
    generator = torch.Generator().manual_seed(0)
    texts = torch.stack([sample_hard_negatives(sim, image_ids, generator, floor=1e-5)[0][0]
                         for _ in range(2000)])
    assert (texts == 1).float().mean().item() == pytest.approx(0.5, abs=0.04)


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


# --- whole-word MLM (X-VLM) ---------------------------------------------------------------------

FIRST = range(200, 600)  # ids that begin a word
NEXT = range(600, VOCAB)  # "##" ids, continuing the word before them


def worded_batch(word_lengths, generator):
    """[CLS] words [SEP] [PAD]...: a row per list of word lengths (in pieces), and each
    row's words as lists of positions."""
    length = max(sum(row) for row in word_lengths) + 2
    input_ids = torch.full((len(word_lengths), length), PAD)
    attention_mask = torch.zeros_like(input_ids)
    words = []
    for row, pieces in enumerate(word_lengths):
        ids, positions = [CLS], []
        for count in pieces:
            positions.append(list(range(len(ids), len(ids) + count)))
            ids.append(FIRST[int(torch.randint(len(FIRST), (1,), generator=generator))])
            ids += [NEXT[int(i)] for i in torch.randint(len(NEXT), (count - 1,), generator=generator)]
        ids.append(SEP)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        words.append(positions)
    return input_ids, attention_mask, words


def mask_words(input_ids, attention_mask, prob=0.25, max_masks=8, span_prob=0.2, seed=0):
    return mask_whole_words(input_ids, attention_mask, mask_id=MASK, vocab_size=VOCAB,
                            special_ids=SPECIAL, continuation_ids=NEXT, prob=prob,
                            max_masks=max_masks, span_prob=span_prob,
                            generator=torch.Generator().manual_seed(seed))


def x_vlm_count(pieces, prob=0.25, max_masks=8):
    """X-VLM's masks per caption: it counts [CLS] with the pieces; Python's round, as its own."""
    return min(max_masks, max(1, round(prob * (pieces + 1))))


def test_whole_word_masking_never_splits_a_word():
    # Words of two pieces and a cap of 8 pieces: single words (no n-grams) fill the count
    # exactly, so X-VLM's trim to the count never cuts one.
    generator = torch.Generator().manual_seed(0)
    input_ids, attention_mask, words = worded_batch([[2] * 18] * 300, generator)
    masked, labels = mask_words(input_ids, attention_mask, span_prob=0.0)
    chosen = labels != IGNORE_INDEX
    for row, positions in enumerate(words):
        picked = [chosen[row, p].tolist() for p in positions]
        assert all(all(word) or not any(word) for word in picked), (row, picked)
        assert sum(all(word) for word in picked) == 4
    # per token, the same rate splits most of them
    _, labels = mask(input_ids, attention_mask, prob=0.25)
    by_token = labels != IGNORE_INDEX
    split = sum(len(set(by_token[row, positions].tolist())) == 2
                for row, row_words in enumerate(words) for positions in row_words)
    assert split > 0.3 * sum(by_token.sum(1).tolist()) / 2


def test_whole_word_masking_counts_as_x_vlm_and_holds_the_cap():
    generator = torch.Generator().manual_seed(1)
    word_lengths = [torch.randint(1, 4, (int(n),), generator=generator).tolist()
                    for n in torch.randint(1, 25, (2000,), generator=generator)]
    input_ids, attention_mask, _ = worded_batch(word_lengths, generator)
    original = input_ids.clone()
    masked, labels = mask_words(input_ids, attention_mask)
    assert torch.equal(input_ids, original)
    chosen = labels != IGNORE_INDEX
    maskable = (attention_mask == 1) & ~torch.isin(input_ids, torch.tensor(SPECIAL))
    assert not (chosen & ~maskable).any()
    counts = chosen.sum(1)
    expected = torch.tensor([x_vlm_count(sum(row)) for row in word_lengths])
    assert torch.equal(counts, expected)  # 1 at least, 8 at most
    assert counts.max() == 8 and counts.min() == 1
    # below the cap, the rate is X-VLM's
    below = (maskable.sum(1) + 1) * 0.25 < 7.5
    rate = counts[below].sum() / maskable.sum(1)[below].sum()
    assert rate.item() == pytest.approx(0.25, abs=0.03)
    # BERT's 80/10/10 on the chosen
    total = chosen.sum()
    assert (masked[chosen] == MASK).sum() / total == pytest.approx(0.8, abs=0.02)
    assert (masked[chosen] == input_ids[chosen]).sum() / total == pytest.approx(0.1, abs=0.02)


def test_spans_mask_neighbouring_words():
    generator = torch.Generator().manual_seed(2)
    input_ids, attention_mask, _ = worded_batch([[1] * 30] * 500, generator)

    def neighbours_masked(span_prob):
        chosen = mask_words(input_ids, attention_mask, span_prob=span_prob)[1] != IGNORE_INDEX
        return ((chosen[:, 1:] & chosen[:, :-1]).sum() / chosen.sum()).item()

    # 8 of 30 words: single words are seldom neighbours; n-grams of 2 or 3 always are
    assert neighbours_masked(0.0) < 0.3 < 0.5 < neighbours_masked(1.0)


def test_whole_word_masking_always_masks_a_caption_that_has_a_word():
    input_ids = torch.tensor([[CLS, 500, SEP, PAD], [CLS, SEP, PAD, PAD], [CLS, 500, 700, SEP]])
    attention_mask = (input_ids != PAD).long()
    for seed in range(20):
        _, labels = mask_words(input_ids, attention_mask, prob=1e-6, seed=seed)
        chosen = (labels != IGNORE_INDEX).tolist()
        assert chosen[0] == [False, True, False, False] and not any(chosen[1])
        assert sum(chosen[2]) == 1  # a count of 1: X-VLM's trim cuts the two-piece word
    first = mask_words(input_ids, attention_mask, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, mask_words(input_ids, attention_mask,
                                                                      seed=5), strict=True))
    with pytest.raises(ValueError, match="max_masks"):
        mask_words(input_ids, attention_mask, max_masks=0)


def test_mask_text_follows_the_masking_rule():
    generator = torch.Generator().manual_seed(3)
    input_ids, attention_mask, _ = worded_batch([[1] * 30] * 200, generator)
    rule = Masking(mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIAL, prob=0.25, max_masks=3,
                   continuation_ids=tuple(NEXT))
    by_token = mask_text(input_ids, attention_mask, rule)[1] != IGNORE_INDEX
    assert by_token.sum(1).max() > 3  # no cap
    whole = Masking(**{**rule.__dict__, "whole_words": True})
    assert (mask_text(input_ids, attention_mask, whole)[1] != IGNORE_INDEX).sum(1).max() == 3


def test_continuation_ids_are_the_wordpiece_vocabularys_continued_pieces(tmp_path):
    texts = ["a small red circle", "a large blue triangle", "the rectangle is grey"] * 20
    tokenizer = train_wordpiece(texts, 60, tmp_path)
    vocab = tokenizer.get_vocab()
    continued = set(continuation_ids(vocab))
    assert continued == {i for token, i in vocab.items() if token.startswith("##")}
    ids = tokenizer("the rectangle is grey")["input_ids"][1:-1]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert len(pieces) > 4  # the small vocabulary splits words
    assert [i in continued for i in ids] == [p.startswith("##") for p in pieces]


def test_text_assignment_asks_each_question_a_third_of_the_time_and_never_with_a_positive():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])  # rows 0, 1 (and 4, 5) show one picture
    embeds = F.normalize(torch.randn(8, 4, generator=generator), dim=-1)
    counts = torch.zeros(3)
    own = torch.arange(8)
    for _ in range(300):
        first, second, labels = assignment_draws(embeds, ids, generator)
        counts += torch.bincount(labels, minlength=3)
        assert torch.equal(first[labels == 0], own[labels == 0])
        assert torch.equal(second[labels == 1], own[labels == 1])
        # every other image shown is a negative: another picture than the text's
        assert (ids[second[labels == 0]] != ids[labels == 0]).all()
        assert (ids[first[labels == 1]] != ids[labels == 1]).all()
        two = labels == 2
        assert (ids[first[two]] != ids[two]).all() and (ids[second[two]] != ids[two]).all()
        assert (first[two] != second[two]).all()  # two different negatives where there are
    assert torch.allclose(counts / counts.sum(), torch.full((3,), 1 / 3), atol=0.03)


def test_text_assignment_draws_negatives_by_image_similarity():
    generator = torch.Generator().manual_seed(0)
    embeds = torch.eye(4)
    embeds[1] = F.normalize(torch.tensor([1.0, 0.2, 0, 0]), dim=0)  # image 1 resembles image 0
    picked = torch.zeros(4)
    for _ in range(500):
        first, second, labels = assignment_draws(embeds, torch.arange(4), generator)
        if labels[0] == 0:
            picked[second[0]] += 1
    assert picked[1] / picked.sum() > 0.99  # exp((0.98 - 0) / 0.07) to one


def test_text_assignment_with_one_negative_shows_it_twice_for_neither():
    generator = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1])
    for _ in range(50):
        first, second, labels = assignment_draws(torch.eye(3), ids, generator)
        assert torch.equal(first[:2][labels[:2] == 2], torch.tensor([2] * int((labels[:2] == 2).sum())))
        assert torch.equal(second[:2][labels[:2] == 2], first[:2][labels[:2] == 2])
