"""Caption generation: greedy search against a brute-force decoder, beam search against greedy,
the cached decoder against the uncached one, and a sliced model against the gated model it came
from."""

import pytest
import torch

from evlm_cli.compress.slice import slice_model
from evlm_cli.models.blocks import DecoderCache
from evlm_cli.models.generate import beam_search, decode_texts, greedy_decode
from evlm_cli.models.vlm import VLM
from tests.helpers.models import random_gates, tiny_config

PAD, BOS, EOS = 0, 2, 3
MAX_LEN = 10
# Raises the end token's score so that, with these seeds, some captions end before MAX_LEN and
# some run to it.
EOS_BIAS = 1.8
TOKENS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)


def captioner(eos_bias: float = EOS_BIAS) -> VLM:
    """A tiny decoder; PyTorch's default initialisation keeps the next token dependent on the
    image and the prefix."""
    torch.manual_seed(0)
    model = VLM(tiny_config(heads=["mlm"], max_positions=MAX_LEN + 1)).eval()
    with torch.no_grad():
        model.heads.mlm.decoder.bias[EOS] += eos_bias
    return model


def images(batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def caption_of(row: torch.Tensor) -> torch.Tensor:
    """A generated row up to and including its first end token (all of it if none)."""
    ends = (row == EOS).nonzero()
    return row if len(ends) == 0 else row[: int(ends[0]) + 1]


def check_format(tokens: torch.Tensor, batch: int) -> None:
    """Rows end at their first end token, padded after it; rows without one fill the width."""
    assert tokens.dtype == torch.long and tokens.shape[0] == batch
    assert tokens.shape[1] <= MAX_LEN
    for row in tokens:
        caption = caption_of(row)
        assert (row[len(caption):] == PAD).all()
        assert caption[-1] == EOS or len(caption) == tokens.shape[1] == MAX_LEN


@torch.no_grad()
def score(model: VLM, image: torch.Tensor, row: torch.Tensor, length_penalty: float) -> float:
    """The caption's summed log-prob by teacher forcing, over its length ** length_penalty."""
    caption = caption_of(row)
    ids = torch.cat([torch.tensor([BOS]), caption])[None]
    out = model(image[None], ids, torch.ones_like(ids), causal=True)
    log_probs = model.logits("captioning", out)[0, :-1].log_softmax(-1)
    total = log_probs.gather(1, caption[:, None]).sum()
    return float(total / len(caption) ** length_penalty)


def test_greedy_decode_equals_a_full_forward_argmax_per_image():
    model, pixels = captioner(), images()
    tokens = greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS)
    check_format(tokens, len(pixels))
    with torch.no_grad():
        for i in range(len(pixels)):
            prefix = torch.tensor([[BOS]])
            while prefix.shape[1] <= MAX_LEN and prefix[0, -1] != EOS:
                out = model(pixels[i : i + 1], prefix, torch.ones_like(prefix), causal=True)
                token = model.logits("captioning", out)[:, -1].argmax(-1)
                prefix = torch.cat([prefix, token[:, None]], dim=1)
            assert torch.equal(caption_of(tokens[i]), prefix[0, 1:])


def test_causal_fused_output_at_a_position_ignores_later_tokens():
    model, pixels = captioner(), images(2)
    ids = torch.randint(4, 40, (2, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        fused = model(pixels, ids, mask, causal=True).fusion.last
        for i in range(ids.shape[1] - 1):
            changed = ids.clone()
            changed[:, i + 1 :] = (changed[:, i + 1 :] + 7) % 40
            again = model(pixels, changed, mask, causal=True).fusion.last
            torch.testing.assert_close(again[:, : i + 1], fused[:, : i + 1])
            assert not torch.allclose(again[:, i + 1], fused[:, i + 1])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_beam_search_with_one_beam_is_greedy_decoding(length_penalty):
    """Also under a length penalty that would rather continue past an early end token."""
    model, pixels = captioner(), images()
    greedy = greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS)
    beam = beam_search(model, pixels, max_len=MAX_LEN, beam_size=1,
                       length_penalty=length_penalty, **TOKENS)
    assert torch.equal(beam, greedy)
    ended = (greedy == EOS).any(1)
    assert ended.any() and not ended.all()  # both kinds of row, so the comparison covers both
    assert (greedy[ended, -1] == PAD).any()  # some caption ended before MAX_LEN


@torch.no_grad()
def plain_beam_search(model: VLM, image: torch.Tensor, beam_size: int,
                      length_penalty: float) -> list[int]:
    """The documented rule written out for one image, one full forward pass per hypothesis."""
    live, finished = [([], 0.0)], []  # (tokens, summed log-prob), (score, tokens)
    for step in range(MAX_LEN):
        candidates = []
        for tokens, total in live:
            ids = torch.tensor([[BOS, *tokens]])
            out = model(image[None], ids, torch.ones_like(ids), causal=True)
            log_probs = model.logits("captioning", out)[0, -1].log_softmax(-1)
            candidates += [(tokens + [v], total + float(lp)) for v, lp in enumerate(log_probs)]
        candidates = sorted(candidates, key=lambda c: -c[1])[: 2 * beam_size]
        length, live = step + 1, []
        for rank, (tokens, total) in enumerate(candidates):
            if tokens[-1] == EOS:
                if rank < beam_size:
                    finished.append((total / length ** length_penalty, tokens))
            elif len(live) < beam_size:
                live.append((tokens, total))
        if length == MAX_LEN:
            finished += [(total / length ** length_penalty, tokens) for tokens, total in live]
        if len(finished) >= beam_size:
            break
    return max(finished, key=lambda f: f[0])[1]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_equals_a_plain_per_image_beam_search(length_penalty):
    model, pixels = captioner(), images()
    beam = beam_search(model, pixels, max_len=MAX_LEN, beam_size=3,
                       length_penalty=length_penalty, **TOKENS)
    check_format(beam, len(pixels))
    for image, row in zip(pixels, beam, strict=True):
        assert caption_of(row).tolist() == plain_beam_search(model, image, 3, length_penalty)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_wider_beam_scores_at_least_as_well_as_greedy(length_penalty):
    """Not a theorem (greedy's path can fall off a beam), but it holds for these seeds, and the
    scores are recomputed independently by teacher forcing."""
    model, pixels = captioner(), images()
    greedy = greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS)
    beam = beam_search(model, pixels, max_len=MAX_LEN, beam_size=4,
                       length_penalty=length_penalty, **TOKENS)
    check_format(beam, len(pixels))
    beam_scores = [score(model, x, row, length_penalty) for x, row in zip(pixels, beam, strict=True)]
    greedy_scores = [score(model, x, row, length_penalty) for x, row in zip(pixels, greedy, strict=True)]
    assert all(b >= g - 1e-5 for b, g in zip(beam_scores, greedy_scores, strict=True))
    assert any(b > g + 1e-3 for b, g in zip(beam_scores, greedy_scores, strict=True))  # the beam matters


def test_generation_stops_once_every_caption_has_ended():
    model, pixels = captioner(eos_bias=20.0), images()
    for tokens in (greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS),
                   beam_search(model, pixels, max_len=MAX_LEN, beam_size=3, **TOKENS)):
        assert torch.equal(tokens, torch.full((len(pixels), 1), EOS))


@pytest.mark.parametrize("max_len", [1, 4])
def test_max_len_is_honoured(max_len):
    model, pixels = captioner(), images()
    for tokens in (greedy_decode(model, pixels, max_len=max_len, **TOKENS),
                   beam_search(model, pixels, max_len=max_len, beam_size=3, **TOKENS)):
        assert tokens.shape[1] <= max_len
        no_end = ~(tokens == EOS).any(1)
        assert tokens.shape[1] == max_len or not no_end.any()


def test_max_len_beyond_the_text_positions_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's 11 text positions"):
        greedy_decode(captioner(), images(1), max_len=MAX_LEN + 2, **TOKENS)


def pruned_gates(model: VLM) -> dict[str, torch.Tensor]:
    """Random gates that empty decoder sublayers, so that the sliced model has a fusion
    self-attention and a cross-attention with nothing to cache, and text FFNs of no width.

    With seed 3, zero layer gates already empty fusion.0's cross-attention and text.1's FFN
    (text.0's FFN is emptied by random_gates), and captions still differ by image."""
    gates = random_gates(model, 0.4, seed=3)
    gates["fusion.1.heads"] = torch.zeros(3)
    return gates


def generate(model: VLM, pixels: torch.Tensor, beam_size: int, **kw) -> torch.Tensor:
    if beam_size == 0:
        return greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS, **kw)
    return beam_search(model, pixels, max_len=MAX_LEN, beam_size=beam_size, **TOKENS, **kw)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("beam_size", [0, 1, 3])  # 0: greedy decoding
def test_the_cached_decoder_generates_what_the_uncached_one_does(beam_size, gated):
    model, pixels = captioner(), images()
    gates = pruned_gates(model) if gated else None
    uncached = generate(model, pixels, beam_size, gates=gates, use_cache=False)
    assert torch.equal(generate(model, pixels, beam_size, gates=gates), uncached)
    lengths = {len(caption_of(row)) for row in uncached}
    assert len(lengths) > 1  # some rows end (and are padded) while others still run


@pytest.mark.parametrize("padded", [False, True])
def test_cached_steps_give_the_full_prefix_logits(padded):
    """Fed in chunks of 1, 3 and 1 tokens (several new tokens attend causally among themselves),
    the cached encoders give every position the logits of one causal pass over the whole
    sequence; a keep-mask covers the cached positions and then the new ones."""
    model, pixels = captioner(), images(2)
    gates = pruned_gates(model)
    ids = torch.randint(4, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, 2] = 0  # not position 0: a query seeing no real key averages over all it sees
    with torch.no_grad():
        full = model.logits("captioning", model(pixels, ids, mask, gates=gates, causal=True))
        image_tokens = model.vision(pixels, gates=gates).last
        text_cache, fusion_cache = DecoderCache(), DecoderCache()
        for start, end in ((0, 1), (1, 4), (4, 5)):
            seen = mask[:, :end] if padded else None
            text = model.encode_text(ids[:, start:end], seen, gates=gates, causal=True,
                                     cache=text_cache).last
            fused = model.fuse(text, seen, image_tokens, gates=gates, causal=True,
                               cache=fusion_cache).last
            torch.testing.assert_close(model.mlm_logits(fused), full[:, start:end],
                                       rtol=1e-5, atol=1e-5)
        assert text_cache.length == fusion_cache.length == 5
        with pytest.raises(ValueError, match="needs causal=True"):
            model.encode_text(ids[:, :1], cache=DecoderCache())


def test_a_sliced_model_generates_what_the_gated_model_did():
    model, pixels = captioner(), images()
    gates = pruned_gates(model)
    sliced = slice_model(model, gates)
    text, fusion = sliced.config.text.encoder, sliced.config.fusion
    assert fusion.heads[1] == fusion.cross_heads[0] == text.ffn[0] == text.ffn[1] == 0
    for beam_size in (0, 3):
        gated = generate(model, pixels, beam_size, gates=gates, use_cache=False)
        assert torch.equal(generate(sliced, pixels, beam_size), gated)
        assert torch.equal(generate(sliced, pixels, beam_size, use_cache=False), gated)
    assert not torch.equal(generate(model, pixels, 0), generate(model, pixels, 0, gates=gates))


class WordTokenizer:
    """Just enough of a Hugging Face tokenizer: one word per id, special ids skipped."""

    special = {PAD: "[PAD]", BOS: "[CLS]", EOS: "[SEP]"}

    def decode(self, ids, skip_special_tokens=False):
        words = [self.special.get(i, f"w{i}") for i in ids
                 if not (skip_special_tokens and i in self.special)]
        return " ".join(words)


def test_decode_texts_stops_at_the_end_token_and_drops_padding():
    tokens = torch.tensor([[5, 6, EOS, PAD], [7, PAD, 8, 9], [EOS, PAD, PAD, PAD]])
    assert decode_texts(tokens, WordTokenizer(), EOS, PAD) == ["w5 w6", "w7 w8 w9", ""]
