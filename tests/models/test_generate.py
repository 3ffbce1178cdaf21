"""Caption generation: greedy search against a brute-force decoder, beam search under X-VLM's
rule and fairseq's against plain per-image searches and a hand-built case where they disagree,
the prompt, the minimum length and blocked tokens, the cached decoder against the uncached one,
and a sliced model against the gated model it came from."""

import math
from types import SimpleNamespace

import pytest
import torch

from evlm_cli.compress.slice import slice_model
from evlm_cli.models.blocks import DecoderCache
from evlm_cli.models.generate import BEAM_RULES, beam_search, decode_texts, greedy_decode
from evlm_cli.models.vlm import VLM
from tests.helpers.models import random_gates, tiny_config

PAD, BOS, EOS = 0, 2, 3
MAX_LEN = 10
# Raises the end token's score so that, with these seeds, some captions end before MAX_LEN and
# some run to it.
EOS_BIAS = 1.8
TOKENS = dict(bos_id=BOS, eos_id=EOS, pad_id=PAD)
PROMPT = (7, 11, 5)  # three prompt tokens, as BERT's "a picture of"


def captioner(eos_bias: float = EOS_BIAS, prompt: tuple[int, ...] = ()) -> VLM:
    """A tiny decoder; PyTorch's default initialisation keeps the next token dependent on the
    image and the prefix. With a prompt, the same weights get the extra text positions the
    prompt takes (new rows of the position table)."""
    torch.manual_seed(0)
    model = VLM(tiny_config(heads=["mlm"], max_positions=MAX_LEN + 1)).eval()
    with torch.no_grad():
        model.heads.mlm.decoder.bias[EOS] += eos_bias
    if not prompt:
        return model
    longer = VLM(tiny_config(heads=["mlm"], max_positions=MAX_LEN + 1 + len(prompt))).eval()
    state = longer.state_dict()
    for name, tensor in model.state_dict().items():
        state[name][: len(tensor)] = tensor
    longer.load_state_dict(state)
    return longer


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


def next_log_probs(model: VLM, image: torch.Tensor):
    """The next token's log-probs after a prefix, by one full forward pass of it."""
    @torch.no_grad()
    def of(prefix: list[int]) -> torch.Tensor:
        ids = torch.tensor([prefix])
        out = model(image[None], ids, torch.ones_like(ids), causal=True)
        return model.logits("captioning", out)[0, -1].float().log_softmax(-1)
    return of


def allowed(log_probs: torch.Tensor, written: int, min_len: int, blocked=()) -> torch.Tensor:
    """Log-probs with the blocked tokens, and the end token before `min_len`, at -inf."""
    log_probs = log_probs.clone()
    log_probs[list(blocked)] = float("-inf")
    if written < min_len:
        log_probs[EOS] = float("-inf")
    return log_probs


@pytest.mark.parametrize("prompt", [(), PROMPT])
def test_greedy_decode_equals_a_full_forward_argmax_per_image(prompt):
    model, pixels = captioner(prompt=prompt), images()
    tokens = greedy_decode(model, pixels, max_len=MAX_LEN, prompt_ids=prompt, **TOKENS)
    check_format(tokens, len(pixels))
    for i in range(len(pixels)):
        prefix, step = [BOS, *prompt], next_log_probs(model, pixels[i])
        while len(prefix) < 1 + len(prompt) + MAX_LEN and prefix[-1] != EOS:
            prefix.append(int(step(prefix).argmax()))
        # The prompt is given, not returned: the rows hold only what the model wrote.
        assert caption_of(tokens[i]).tolist() == prefix[1 + len(prompt):]


def test_a_prompt_changes_the_captions():
    model, pixels = captioner(prompt=PROMPT), images()
    plain = greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS)
    prompted = greedy_decode(model, pixels, max_len=MAX_LEN, prompt_ids=PROMPT, **TOKENS)
    assert not torch.equal(plain, prompted)


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


@pytest.mark.parametrize("rule", BEAM_RULES)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 3.0])
def test_beam_search_with_one_beam_is_greedy_decoding(rule, length_penalty):
    """Also under a length penalty that would rather continue past an early end token."""
    model, pixels = captioner(), images()
    greedy = greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS)
    beam = beam_search(model, pixels, max_len=MAX_LEN, beam_size=1, rule=rule,
                       length_penalty=length_penalty, **TOKENS)
    assert torch.equal(beam, greedy)
    ended = (greedy == EOS).any(1)
    assert ended.any() and not ended.all()  # both kinds of row, so the comparison covers both
    assert (greedy[ended, -1] == PAD).any()  # some caption ended before MAX_LEN


def plain_fairseq_beam_search(next_log_probs, start: list[int], beam_size: int,
                              length_penalty: float, min_len: int = 0, blocked=()) -> list[int]:
    """evlm's earlier rule written out for one image: a finished hypothesis scores its summed
    log-prob over its written tokens (end token included); done at beam_size finished."""
    live, finished = [(start, 0.0)], []  # (prefix, summed log-prob), (score, written tokens)
    for step in range(MAX_LEN):
        candidates = []
        for prefix, total in live:
            log_probs = allowed(next_log_probs(prefix), step, min_len, blocked)
            candidates += [(prefix + [v], total + float(lp)) for v, lp in enumerate(log_probs)]
        candidates = sorted(candidates, key=lambda c: -c[1])[: 2 * beam_size]
        length, live = step + 1, []
        for rank, (prefix, total) in enumerate(candidates):
            if prefix[-1] == EOS:
                if rank < beam_size:
                    finished.append((total / length ** length_penalty, prefix[len(start):]))
            elif len(live) < beam_size:
                live.append((prefix, total))
        if length == MAX_LEN:
            finished += [(total / length ** length_penalty, prefix[len(start):])
                         for prefix, total in live]
        if len(finished) >= beam_size:
            break
    return max(finished, key=lambda f: f[0])[1]


def plain_xvlm_beam_search(next_log_probs, start: list[int], beam_size: int,
                           length_penalty: float, min_len: int = 0, blocked=()) -> list[int]:
    """X-VLM's beam search written out for one image as transformers 4.12 runs it
    (`generate` -> `beam_search` with `BeamSearchScorer` and `BeamHypotheses`, early_stopping
    False): a finished hypothesis is its sequence without the end token, scored over its whole
    length; the k best are kept, and the image is done once k are kept and the worst scores at
    least the best candidate's sum over the current length."""
    max_length = len(start) + MAX_LEN
    hypotheses, worst = [], 1e9  # BeamHypotheses: (score, sequence), the worst kept score

    def add(sequence: list[int], total: float) -> None:
        nonlocal worst
        score = total / len(sequence) ** length_penalty
        if len(hypotheses) < beam_size or score > worst:
            hypotheses.append((score, sequence))
            if len(hypotheses) > beam_size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(hypotheses))
                del hypotheses[ranked[0][1]]
                worst = ranked[1][0]
            else:
                worst = min(score, worst)

    beams, done = [(start, 0.0)], False
    for cur_len in range(len(start), max_length):
        candidates = []
        for sequence, total in beams:
            log_probs = allowed(next_log_probs(sequence), cur_len - len(start), min_len, blocked)
            candidates += [(total + float(lp), sequence, v) for v, lp in enumerate(log_probs)]
        candidates = sorted(candidates, key=lambda c: -c[0])[: 2 * beam_size]
        beams = []
        for rank, (total, sequence, token) in enumerate(candidates):
            if token == EOS:
                if rank < beam_size:
                    add(sequence, total)
            else:
                beams.append((sequence + [token], total))
            if len(beams) == beam_size:
                break
        done = (len(hypotheses) >= beam_size
                and worst >= candidates[0][0] / cur_len ** length_penalty)
        if done:
            break
    if not done:
        for sequence, total in beams:
            add(sequence, total)
    best = sorted(hypotheses, key=lambda h: h[0])[-1][1]
    return best[len(start):] + ([EOS] if len(best) < max_length else [])


PLAIN = {"xvlm": plain_xvlm_beam_search, "fairseq": plain_fairseq_beam_search}


@pytest.mark.parametrize("rule", BEAM_RULES)
@pytest.mark.parametrize("length_penalty,prompt,min_len,blocked", [
    (0.0, (), 0, ()), (1.0, (), 0, ()), (1.0, PROMPT, 0, ()), (1.0, PROMPT, 2, (PAD, BOS)),
])
def test_beam_search_equals_a_plain_per_image_beam_search(rule, length_penalty, prompt,
                                                          min_len, blocked):
    model, pixels = captioner(prompt=prompt), images()
    beam = beam_search(model, pixels, max_len=MAX_LEN, beam_size=3, rule=rule,
                       length_penalty=length_penalty, prompt_ids=prompt, min_len=min_len,
                       blocked_ids=blocked, **TOKENS)
    check_format(beam, len(pixels))
    for image, row in zip(pixels, beam, strict=True):
        expected = PLAIN[rule](next_log_probs(model, image), [BOS, *prompt], 3, length_penalty,
                               min_len, blocked)
        assert caption_of(row).tolist() == expected


def test_the_two_beam_rules_write_different_captions_here():
    """So the parity tests above tell the rules apart."""
    model, pixels = captioner(prompt=PROMPT), images()
    xvlm, fairseq = (beam_search(model, pixels, max_len=MAX_LEN, beam_size=3, rule=rule,
                                 prompt_ids=PROMPT, **TOKENS) for rule in BEAM_RULES)
    assert not torch.equal(xvlm, fairseq)


class TableDecoder:
    """A stand-in for the VLM whose next-token probabilities are a table of written prefixes:
    {written tokens: {token: probability}}, the rest of the mass spread over the other words
    (never the end token). It feeds each position the whole prefix, so the decoders, run
    without a cache, read the table through the VLM's methods."""

    def __init__(self, table: dict, start: int, vocab: int):
        self.table, self.start, self.vocab = table, start, vocab
        self.config = SimpleNamespace(text=SimpleNamespace(vocab_size=vocab, max_positions=32))

    def vision(self, images, gates=None):
        return SimpleNamespace(last=torch.zeros(images.shape[0], 1, 1))

    def encode_text(self, prefix, mask, gates=None, causal=True, cache=None):
        t = prefix.shape[1]
        return SimpleNamespace(last=prefix.float()[:, None, :].expand(-1, t, -1))

    def fuse(self, text, mask, image_tokens, gates=None, causal=True, cache=None):
        return SimpleNamespace(last=text)

    def mlm_logits(self, state):
        return torch.stack([self._log_probs(tuple(int(t) for t in row[self.start:]))
                            for row in state])

    def _log_probs(self, written: tuple[int, ...]) -> torch.Tensor:
        given = self.table.get(written, {})
        others = [t for t in range(EOS + 1, self.vocab) if t not in given]
        rest = (1.0 - sum(given.values())) / len(others)
        probs = torch.full((self.vocab,), 1e-9)
        probs[others] = rest
        for token, p in given.items():
            probs[token] = p
        return probs.log()


def test_the_rules_differ_in_how_a_finished_caption_is_normalised():
    """With a three-token prompt, X-VLM divides the summed log-prob s of "a [SEP]" by 5 (the
    begin token, the prompt and one word) and that of "a c c c [SEP]" by 8; fairseq divides by
    the tokens written, 2 and 5. The table makes s about -1.0 and -2.0: fairseq prefers the
    long caption (-0.40 > -0.50), X-VLM the short one (-0.20 > -0.25)."""
    a, b, c = 8, 9, 10
    p_a, p_end_after_a, p_c_after_a = 0.95, math.exp(-1.0) / 0.95, 0.6
    p_each = math.exp((-2.0 - math.log(p_a) - math.log(p_c_after_a)) / 3)
    table = {(): {a: p_a, b: 0.02}, (a,): {EOS: p_end_after_a, c: p_c_after_a},
             (a, c): {c: p_each}, (a, c, c): {c: p_each}, (a, c, c, c): {EOS: p_each}}
    decoder = TableDecoder(table, start=1 + len(PROMPT), vocab=16)
    pixels = torch.zeros(1, 3, 16, 16)
    chosen = {rule: beam_search(decoder, pixels, max_len=6, beam_size=2, rule=rule,
                                prompt_ids=PROMPT, use_cache=False, **TOKENS)[0].tolist()
              for rule in BEAM_RULES}
    assert chosen["xvlm"] == [a, EOS]
    assert chosen["fairseq"] == [a, c, c, c, EOS]


def test_the_rules_differ_in_when_they_stop():
    """No prompt, so both rules divide an ended caption's sum by the same length. Two beams:
    "[SEP]" and "a [SEP]" end first. fairseq stops there, with two finished; X-VLM goes on,
    since the best extension "b d" over the current length (-1.68 / 2) still beats the worse
    of them (-3.5 / 2), and finds "b d [SEP]" (-1.70 / 3, better than "[SEP]", -0.69 / 1)."""
    a, b, d = 8, 9, 10
    table = {(): {EOS: 0.5, a: 0.3, b: 0.19}, (a,): {EOS: 0.1},
             (b,): {d: 0.98}, (b, d): {EOS: 0.98}}
    decoder = TableDecoder(table, start=1, vocab=16)
    pixels = torch.zeros(1, 3, 16, 16)
    chosen = {rule: beam_search(decoder, pixels, max_len=6, beam_size=2, rule=rule,
                                use_cache=False, **TOKENS)[0].tolist()
              for rule in BEAM_RULES}
    assert chosen["fairseq"] == [EOS]
    assert chosen["xvlm"] == [b, d, EOS]


@pytest.mark.parametrize("rule", BEAM_RULES)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_a_wider_beam_scores_at_least_as_well_as_greedy(rule, length_penalty):
    """Not a theorem (greedy's path can fall off a beam), but it holds for these seeds, and the
    scores are recomputed independently by teacher forcing. Scored as fairseq does; X-VLM's
    score only adds the begin token to every length (no prompt) and drops the end token."""
    model, pixels = captioner(), images()
    greedy = greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS)
    beam = beam_search(model, pixels, max_len=MAX_LEN, beam_size=4, rule=rule,
                       length_penalty=length_penalty, **TOKENS)
    check_format(beam, len(pixels))
    beam_scores = [score(model, x, row, length_penalty) for x, row in zip(pixels, beam, strict=True)]
    greedy_scores = [score(model, x, row, length_penalty) for x, row in zip(pixels, greedy, strict=True)]
    if rule == "fairseq":
        assert all(b >= g - 1e-5 for b, g in zip(beam_scores, greedy_scores, strict=True))
    assert any(b > g + 1e-3 for b, g in zip(beam_scores, greedy_scores, strict=True))  # the beam matters


@pytest.mark.parametrize("rule", BEAM_RULES)
def test_generation_stops_once_every_caption_has_ended(rule):
    model, pixels = captioner(eos_bias=20.0), images()
    for tokens in (greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS),
                   beam_search(model, pixels, max_len=MAX_LEN, beam_size=3, rule=rule, **TOKENS)):
        assert torch.equal(tokens, torch.full((len(pixels), 1), EOS))


@pytest.mark.parametrize("rule", BEAM_RULES)
@pytest.mark.parametrize("min_len", [1, 3])
def test_no_caption_ends_before_the_minimum_length(rule, min_len):
    """A model that would end every caption at once writes exactly min_len words first."""
    model, pixels = captioner(eos_bias=20.0), images()
    for tokens in (greedy_decode(model, pixels, max_len=MAX_LEN, min_len=min_len, **TOKENS),
                   beam_search(model, pixels, max_len=MAX_LEN, beam_size=3, rule=rule,
                               min_len=min_len, **TOKENS)):
        assert tokens.shape == (len(pixels), min_len + 1)
        assert (tokens[:, :min_len] != EOS).all() and (tokens[:, min_len] == EOS).all()


@pytest.mark.parametrize("beam_size,rule", [(0, None), (3, "xvlm"), (3, "fairseq")])
def test_blocked_tokens_are_never_written(beam_size, rule):
    model, pixels = captioner(), images()

    def run(blocked):
        if beam_size == 0:
            return greedy_decode(model, pixels, max_len=MAX_LEN, blocked_ids=blocked, **TOKENS)
        return beam_search(model, pixels, max_len=MAX_LEN, beam_size=beam_size, rule=rule,
                           blocked_ids=blocked, **TOKENS)

    written = torch.cat([caption_of(row) for row in run(())])
    assert PAD in written  # this model writes padding inside captions when allowed
    # Padding, the begin token and the two words the unblocked search writes most.
    counts = written.bincount(minlength=EOS + 1)
    counts[[PAD, BOS, EOS]] = 0
    blocked = [PAD, BOS, *(int(t) for t in counts.topk(2).indices)]
    for row in run(blocked):
        assert not set(caption_of(row).tolist()) & set(blocked)


def test_the_end_token_cannot_be_blocked():
    with pytest.raises(ValueError, match="end token 3 cannot be blocked"):
        greedy_decode(captioner(), images(1), max_len=MAX_LEN, blocked_ids=(EOS,), **TOKENS)


@pytest.mark.parametrize("rule", BEAM_RULES)
@pytest.mark.parametrize("max_len", [1, 4])
def test_max_len_is_honoured(rule, max_len):
    model, pixels = captioner(prompt=PROMPT), images()
    for tokens in (greedy_decode(model, pixels, max_len=max_len, prompt_ids=PROMPT, **TOKENS),
                   beam_search(model, pixels, max_len=max_len, beam_size=3, rule=rule,
                               prompt_ids=PROMPT, **TOKENS)):
        assert tokens.shape[1] <= max_len
        no_end = ~(tokens == EOS).any(1)
        assert tokens.shape[1] == max_len or not no_end.any()


def test_max_len_beyond_the_text_positions_is_refused():
    with pytest.raises(ValueError, match="exceeds the model's 11 text positions"):
        greedy_decode(captioner(), images(1), max_len=MAX_LEN + 2, **TOKENS)
    with pytest.raises(ValueError, match="prompt of 3 tokens exceeds the model's 11"):
        greedy_decode(captioner(), images(1), max_len=MAX_LEN, prompt_ids=PROMPT, **TOKENS)


def pruned_gates(model: VLM) -> dict[str, torch.Tensor]:
    """Random gates that empty decoder sublayers, so that the sliced model has a fusion
    self-attention and a cross-attention with nothing to cache, and text FFNs of no width.

    With seed 3, zero layer gates already empty fusion.0's cross-attention and text.1's FFN
    (text.0's FFN is emptied by random_gates), and captions still differ by image."""
    gates = random_gates(model, 0.4, seed=3)
    gates["fusion.1.heads"] = torch.zeros(3)
    return gates


def generate(model: VLM, pixels: torch.Tensor, beam_size: int, rule: str = "xvlm",
             **kw) -> torch.Tensor:
    if beam_size == 0:
        return greedy_decode(model, pixels, max_len=MAX_LEN, **TOKENS, **kw)
    return beam_search(model, pixels, max_len=MAX_LEN, beam_size=beam_size, rule=rule,
                       **TOKENS, **kw)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("beam_size", [0, 1, 3])  # 0: greedy decoding
def test_the_cached_decoder_generates_what_the_uncached_one_does(beam_size, gated):
    model, pixels = captioner(), images()
    gates = pruned_gates(model) if gated else None
    lengths = set()
    for rule in BEAM_RULES:
        uncached = generate(model, pixels, beam_size, gates=gates, use_cache=False, rule=rule)
        assert torch.equal(generate(model, pixels, beam_size, gates=gates, rule=rule), uncached)
        lengths |= {len(caption_of(row)) for row in uncached}
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
