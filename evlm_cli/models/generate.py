"""Caption generation: the VLM run as a decoder, by greedy search or beam search.

The captioning model is the ordinary VLM with causal self-attention in its text and fusion
encoders; the MLM head reads each position's fused state as the next token's scores. Captions
look like BERT's `[CLS] prompt w1 .. wn [SEP] [PAD]..`: [CLS] and the prompt's tokens (X-VLM's
"a picture of ", or none) are given, the model writes the rest, and [SEP] ends a caption.

Both searches return the tokens written after the prompt, [B, T] with T <= max_len: each row
ends at its first end token (included) and is padded with `pad_id` after it, or runs to max_len.
So the prompt never reaches the caption text.

Two rules shape what may be written, applied as Hugging Face's logits processors are: the end
token is forbidden until `min_len` tokens are written (X-VLM's min_length), and `blocked_ids`
(special tokens such as [PAD], [UNK], [CLS], [MASK]) are forbidden throughout. X-VLM blocks
none; its captions, like these, only drop special tokens from their text.

Each step feeds only the newest token: the text and fusion encoders keep every layer's keys
and values of the prefix (`blocks.DecoderCache`), and the fusion layers project the image
tokens to keys and values once. `use_cache=False` reruns the whole prefix at every step
instead, the plain definition that the tests hold the cached decoder to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from evlm_cli.models.blocks import DecoderCache, Gates
from evlm_cli.models.vlm import VLM


@dataclass
class PrefixCache:
    """The text and fusion encoders' caches of the prefixes decoded so far, a row per
    hypothesis."""

    text: DecoderCache = field(default_factory=DecoderCache)
    fusion: DecoderCache = field(default_factory=DecoderCache)

    def reorder(self, rows: Tensor) -> None:
        """Row i continues row `rows[i]`, a row of the same image (see DecoderCache.reorder)."""
        self.text.reorder(rows)
        self.fusion.reorder(rows)


# How beam search scores finished captions and when it stops (see `beam_search`).
BEAM_RULES = ("xvlm", "fairseq")


def _check(model: VLM, max_len: int, start: int) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, not {max_len}")
    # The last step reads the begin token, the prompt and max_len - 1 written tokens.
    if start + max_len - 1 > model.config.text.max_positions:
        raise ValueError(f"max_len {max_len} after a prompt of {start - 1} tokens exceeds the "
                         f"model's {model.config.text.max_positions} text positions")


def _start(rows: int, bos_id: int, prompt_ids: Sequence[int], device: torch.device) -> Tensor:
    """[rows, 1 + len(prompt_ids)]: the begin token and the prompt, given to every caption."""
    given = torch.tensor([bos_id, *prompt_ids], dtype=torch.long, device=device)
    return given.expand(rows, -1).clone()


def _blocked(blocked_ids: Sequence[int], eos_id: int, device: torch.device) -> Tensor:
    if eos_id in blocked_ids:
        raise ValueError(f"the end token {eos_id} cannot be blocked: no caption would end")
    return torch.tensor(sorted(set(blocked_ids)), dtype=torch.long, device=device)


def _forbid(scores: Tensor, written: int, eos_id: int, min_len: int, blocked: Tensor) -> Tensor:
    """`scores` [rows, V] with what may not come next at -inf: the blocked tokens always, the
    end token while fewer than `min_len` tokens are written. A negative `eos_id` is no token
    (timing runs every caption to full length)."""
    if len(blocked):
        scores = scores.index_fill(-1, blocked, float("-inf"))
    if written < min_len and eos_id >= 0:
        scores = scores.index_fill(-1, torch.tensor([eos_id], device=scores.device),
                                   float("-inf"))
    return scores


def _next_token_logits(model: VLM, prefix: Tensor, image_tokens: Tensor,
                       gates: Gates | None, cache: PrefixCache | None) -> Tensor:
    """Scores [rows, V] of the token after each row of `prefix` [rows, t]; with a cache, only
    the tokens it has not seen yet are run."""
    text_cache = fusion_cache = None
    if cache is not None:
        prefix, text_cache, fusion_cache = prefix[:, cache.text.length:], cache.text, cache.fusion
    # No padding mask: every prefix token is real (tokens after an end are never read by the
    # rows that matter, since attention is causal).
    text = model.encode_text(prefix, None, gates=gates, causal=True, cache=text_cache).last
    fused = model.fuse(text, None, image_tokens, gates=gates, causal=True,
                       cache=fusion_cache).last
    return model.mlm_logits(fused[:, -1])


@torch.inference_mode()
def greedy_decode(model: VLM, images: Tensor, *, bos_id: int, eos_id: int, pad_id: int,
                  max_len: int, prompt_ids: Sequence[int] = (), min_len: int = 0,
                  blocked_ids: Sequence[int] = (), gates: Gates | None = None,
                  use_cache: bool = True) -> Tensor:
    """The most likely allowed next token at every step, after the begin token and the prompt,
    until each row has produced `eos_id` or `max_len` tokens. Returns long [B, T <= max_len]
    (see the module docstring)."""
    start = 1 + len(prompt_ids)
    _check(model, max_len, start)
    image_tokens = model.vision(images, gates=gates).last
    rows, device = images.shape[0], images.device
    prefix = _start(rows, bos_id, prompt_ids, device)
    blocked = _blocked(blocked_ids, eos_id, device)
    ended = torch.zeros(rows, dtype=torch.bool, device=device)
    cache = PrefixCache() if use_cache else None
    for written in range(max_len):
        logits = _next_token_logits(model, prefix, image_tokens, gates, cache)
        token = _forbid(logits, written, eos_id, min_len, blocked).argmax(-1)
        token = token.masked_fill(ended, pad_id)
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        ended |= token == eos_id
        if ended.all():
            break
    return prefix[:, start:]


@torch.inference_mode()
def beam_search(model: VLM, images: Tensor, *, bos_id: int, eos_id: int, pad_id: int,
                max_len: int, beam_size: int, rule: str, prompt_ids: Sequence[int] = (),
                min_len: int = 0, blocked_ids: Sequence[int] = (), gates: Gates | None = None,
                length_penalty: float = 1.0, use_cache: bool = True) -> Tensor:
    """The best finished hypothesis per image under beam search, by X-VLM's rule or fairseq's.

    Both rules keep `beam_size` live hypotheses per image. At each step the 2 * beam_size best
    extensions are ranked by summed log-prob (the forbidden tokens of the module docstring
    at -inf, without renormalising, as Hugging Face applies its logits processors after the
    log-softmax); an extension by the end token that ranks within the first beam_size
    finishes, and the best beam_size extensions that do not end stay live. A live hypothesis
    that reaches max_len also finishes. The rules differ in a finished hypothesis's length n,
    which divides its summed log-prob s into its score s / n ** length_penalty, and in when an
    image is done.

    `xvlm`: Hugging Face's beam search as X-VLM calls it (`generate` with `early_stopping`
    False, transformers 4.12's `BeamSearchScorer`). n counts the whole sequence, the begin
    token and the prompt included, but not the end token. The image keeps its beam_size best
    finished hypotheses, and is done once it has beam_size of them and the worst scores at
    least the best extension's summed log-prob over the current sequence length (a
    heuristic: a longer continuation may still have scored higher).

    `fairseq`: evlm's earlier rule. n counts the tokens written, the end token included (1.0:
    the mean log-prob per written token). The image is done once beam_size hypotheses have
    finished, or earlier when no live hypothesis can still beat its best finished one (log-probs
    only fall, so a live sum s bounds every continuation by s / n ** length_penalty at the most
    favourable length n: that pruning never changes the result).

    Under either rule beam_size=1 is greedy decoding, for every length penalty (up to float
    ties between the best two tokens): when the end token is the best extension it finishes,
    and the image is done before the runner-up, whose longer continuations could still win
    under a positive length penalty, is extended.
    """
    if rule not in BEAM_RULES:
        raise ValueError(f"beam rule must be one of {', '.join(BEAM_RULES)}, not {rule!r}")
    start = 1 + len(prompt_ids)
    _check(model, max_len, start)
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, not {beam_size}")
    device = images.device
    blocked = _blocked(blocked_ids, eos_id, device)
    vocab = model.config.text.vocab_size
    # The first step draws all 2 * beam_size candidates from the one starting beam.
    writable = vocab - len(blocked) - (min_len > 0)
    if 2 * beam_size > writable:
        raise ValueError(f"beam_size {beam_size} needs at least {2 * beam_size} tokens it may "
                         f"write, not {writable}")
    images_n, k = images.shape[0], beam_size
    image_tokens = model.vision(images, gates=gates).last.repeat_interleave(k, dim=0)

    # Live hypotheses [B, k, t] (begin token and prompt included) and their summed log-probs.
    # At the start the k beams are the same empty caption: only the first may be extended.
    live = _start(images_n * k, bos_id, prompt_ids, device).view(images_n, k, start)
    live_sums = torch.zeros(images_n, k, device=device)
    live_sums[:, 1:] = float("-inf")
    best_tokens = torch.full((images_n, max_len), pad_id, dtype=torch.long, device=device)
    best_lengths = torch.zeros(images_n, dtype=torch.long, device=device)
    best_scores = torch.full((images_n,), float("-inf"), device=device)
    finished = torch.zeros(images_n, dtype=torch.long, device=device)
    kept = torch.full((images_n, k), float("-inf"), device=device)  # xvlm: the k best finished
    done = torch.zeros(images_n, dtype=torch.bool, device=device)
    rank = torch.arange(2 * k, device=device).expand(images_n, -1)
    rows = torch.arange(images_n, device=device)
    cache = PrefixCache() if use_cache else None

    def finish(finishing: Tensor, scores: Tensor, extended: Tensor, written: int) -> None:
        """Make the best of `scores` [B, 2k] where `finishing` the image's best if it beats it."""
        top_score, top = torch.where(finishing, scores, float("-inf")).max(dim=1)
        better = top_score > best_scores
        best_scores.copy_(torch.where(better, top_score, best_scores))
        best_lengths.copy_(torch.where(better, written, best_lengths))
        # A later best is never shorter, so writing its tokens over the old ones is enough.
        best_tokens[better, :written] = extended[rows, top][better, start:]

    for step in range(max_len):
        written = step + 1  # tokens written in each extension
        logits = _next_token_logits(model, live.flatten(0, 1), image_tokens, gates, cache)
        log_probs = _forbid(logits.float().log_softmax(-1), step, eos_id, min_len, blocked)
        candidates = live_sums[..., None] + log_probs.view(images_n, k, vocab)
        sums, index = candidates.flatten(1).topk(2 * k, dim=1)
        parent, token = index // vocab, index % vocab
        extended = torch.cat([live.gather(1, parent[..., None].expand(-1, -1, live.shape[2])),
                              token[..., None]], dim=2)

        # The first k extensions that do not end stay live (there are at least k: each beam
        # has at most one end token among the 2k).
        ends = token == eos_id
        keep = (ends.long() * 2 * k + rank).topk(k, dim=1, largest=False).indices
        live_sums = sums.gather(1, keep)
        was_done = done.clone()
        ending = ends & (rank < k) & ~was_done[:, None]
        # xvlm: the sequence before the new token, the length of an ending hypothesis.
        length = start + step if rule == "xvlm" else written
        scores = sums / length ** length_penalty
        finish(ending, scores, extended, written)
        finished += ending.sum(1)
        if rule == "xvlm":
            kept = torch.cat([kept, scores.masked_fill(~ending, float("-inf"))], dim=1)
            kept = kept.topk(k, dim=1).values
            hopeless = kept[:, -1] >= sums[:, 0] / length ** length_penalty
            done |= (finished >= k) & hopeless
        else:
            most_favourable = max_len if length_penalty > 0 else written + 1
            bound = live_sums.max(1).values / most_favourable ** length_penalty
            done |= (finished >= k) | (bound <= best_scores)
        if written == max_len:
            # The live hypotheses finish too: xvlm's unless the image is done by now (and
            # their length counts the new token), fairseq's unless it was done before.
            at_max = torch.zeros_like(ends).scatter(1, keep, True)
            at_max &= ~(done if rule == "xvlm" else was_done)[:, None]
            length = start + written if rule == "xvlm" else written
            finish(at_max, sums / length ** length_penalty, extended, written)
            break
        live = extended.gather(1, keep[..., None].expand(-1, -1, extended.shape[2]))
        if done.all():
            break
        if cache is not None:  # each live row continues its parent's cached prefix
            cache.reorder((rows[:, None] * k + parent.gather(1, keep)).flatten())
    return best_tokens[:, : int(best_lengths.max())]


def decode_texts(tokens: Tensor, tokenizer, eos_id: int, pad_id: int) -> list[str]:
    """The caption strings of generated rows: each row up to its first end token, without
    padding, through `tokenizer.decode(..., skip_special_tokens=True)`."""
    texts = []
    for row in tokens.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        texts.append(tokenizer.decode([t for t in row if t != pad_id], skip_special_tokens=True))
    return texts
