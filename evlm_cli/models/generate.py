"""Caption generation: the VLM run as a decoder, by greedy search or beam search.

The captioning model is the ordinary VLM with causal self-attention in its text and fusion
encoders; the MLM head reads each position's fused state as the next token's scores. Captions
look like BERT's `[CLS] w1 .. wn [SEP] [PAD]..`, so [CLS] begins and [SEP] ends a caption.

Both searches return the tokens after the begin token, [B, T] with T <= max_len: each row ends
at its first end token (included) and is padded with `pad_id` after it, or runs to max_len.

Each step feeds only the newest token: the text and fusion encoders keep every layer's keys
and values of the prefix (`blocks.DecoderCache`), and the fusion layers project the image
tokens to keys and values once. `use_cache=False` reruns the whole prefix at every step
instead, the plain definition that the tests hold the cached decoder to.
"""

from __future__ import annotations

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


def _check(model: VLM, max_len: int) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, not {max_len}")
    # The last step reads a prefix of max_len tokens (the begin token and max_len - 1 more).
    if max_len > model.config.text.max_positions:
        raise ValueError(f"max_len {max_len} exceeds the model's {model.config.text.max_positions} "
                         "text positions")


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
                  max_len: int, gates: Gates | None = None, use_cache: bool = True) -> Tensor:
    """The most likely next token at every step, until each row has produced `eos_id` or
    `max_len` tokens. Returns long [B, T <= max_len] (see the module docstring)."""
    _check(model, max_len)
    image_tokens = model.vision(images, gates=gates).last
    rows = images.shape[0]
    prefix = torch.full((rows, 1), bos_id, dtype=torch.long, device=images.device)
    ended = torch.zeros(rows, dtype=torch.bool, device=images.device)
    cache = PrefixCache() if use_cache else None
    for _ in range(max_len):
        token = _next_token_logits(model, prefix, image_tokens, gates, cache).argmax(-1)
        token = token.masked_fill(ended, pad_id)
        prefix = torch.cat([prefix, token[:, None]], dim=1)
        ended |= token == eos_id
        if ended.all():
            break
    return prefix[:, 1:]


@torch.inference_mode()
def beam_search(model: VLM, images: Tensor, *, bos_id: int, eos_id: int, pad_id: int,
                max_len: int, beam_size: int, gates: Gates | None = None,
                length_penalty: float = 1.0, use_cache: bool = True) -> Tensor:
    """The best finished hypothesis per image under beam search, as fairseq runs it.

    A hypothesis of n generated tokens (its end token included) with summed log-probability s
    scores s / n ** length_penalty (1.0: the mean log-prob per token; 0: the plain sum; larger
    values favour longer captions). Each image keeps `beam_size` live hypotheses. At each step
    the 2 * beam_size best extensions are ranked by summed log-prob; an extension by the end
    token that ranks within the first beam_size finishes, and the best beam_size extensions
    that do not end stay live. A live hypothesis that reaches max_len also finishes.

    An image is done when `beam_size` hypotheses have finished (fairseq's rule, and Hugging
    Face's `early_stopping=True`), or earlier when no live hypothesis can still beat its best
    finished one (log-probs only fall, so a live sum s bounds every continuation by
    s / n ** length_penalty at the most favourable length n: that pruning never changes the
    result).

    Why the first rule: with one beam, when the end token is the best extension it finishes
    and the live beam becomes the runner-up, whose longer continuations could still win under
    a positive length penalty. Counting finished hypotheses ends the image right there, so
    beam_size=1 is greedy decoding for every length penalty (up to float ties between the
    best two tokens).
    """
    _check(model, max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, not {beam_size}")
    vocab = model.config.text.vocab_size
    # The first step draws all 2 * beam_size candidates from the one starting beam.
    if 2 * beam_size > vocab:
        raise ValueError(f"beam_size {beam_size} needs a vocabulary of at least "
                         f"{2 * beam_size} tokens, not {vocab}")
    device = images.device
    images_n, k = images.shape[0], beam_size
    image_tokens = model.vision(images, gates=gates).last.repeat_interleave(k, dim=0)

    # Live hypotheses [B, k, t] (begin token included) and their summed log-probs. At the
    # start the k beams are the same empty caption: only the first may be extended.
    live = torch.full((images_n, k, 1), bos_id, dtype=torch.long, device=device)
    live_sums = torch.zeros(images_n, k, device=device)
    live_sums[:, 1:] = float("-inf")
    best_tokens = torch.full((images_n, max_len), pad_id, dtype=torch.long, device=device)
    best_lengths = torch.zeros(images_n, dtype=torch.long, device=device)
    best_scores = torch.full((images_n,), float("-inf"), device=device)
    finished = torch.zeros(images_n, dtype=torch.long, device=device)
    done = torch.zeros(images_n, dtype=torch.bool, device=device)
    rank = torch.arange(2 * k, device=device).expand(images_n, -1)
    rows = torch.arange(images_n, device=device)
    cache = PrefixCache() if use_cache else None

    for step in range(max_len):
        length = step + 1  # generated tokens in each extension
        logits = _next_token_logits(model, live.flatten(0, 1), image_tokens, gates, cache)
        log_probs = logits.float().log_softmax(-1).view(images_n, k, vocab)
        sums, index = (live_sums[..., None] + log_probs).flatten(1).topk(2 * k, dim=1)
        parent, token = index // vocab, index % vocab
        extended = torch.cat([live.gather(1, parent[..., None].expand(-1, -1, live.shape[2])),
                              token[..., None]], dim=2)

        # The first k extensions that do not end stay live (there are at least k: each beam
        # has at most one end token among the 2k).
        ends = token == eos_id
        keep = (ends.long() * 2 * k + rank).topk(k, dim=1, largest=False).indices
        finishing = ends & (rank < k)
        if length == max_len:
            finishing = finishing.scatter(1, keep, True)
        finishing &= ~done[:, None]

        scores = torch.where(finishing, sums / length ** length_penalty, float("-inf"))
        top_score, top = scores.max(dim=1)
        better = top_score > best_scores
        best_scores = torch.where(better, top_score, best_scores)
        best_lengths = torch.where(better, length, best_lengths)
        # A later best is never shorter, so writing its tokens over the old ones is enough.
        best_tokens[better, :length] = extended[rows, top][better, 1:]
        finished += finishing.sum(1)

        live = extended.gather(1, keep[..., None].expand(-1, -1, extended.shape[2]))
        live_sums = sums.gather(1, keep)
        most_favourable = max_len if length_penalty > 0 else length + 1
        can_still_win = live_sums.max(1).values / most_favourable ** length_penalty > best_scores
        done |= (finished >= k) | ~can_still_win
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
