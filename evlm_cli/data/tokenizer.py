"""BERT WordPiece tokenizers: load one from a local HF directory or file, or train one on questions."""

from __future__ import annotations

import os
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

from evlm_cli.core.errors import DataError

if TYPE_CHECKING:  # transformers is slow to import: only functions that build a
    from transformers import BertTokenizerFast  # tokenizer import it

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Order fixes the ids of a trained vocabulary: [PAD] is 0, as every padding mask here assumes.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
REQUIRED_TOKENS = (PAD, UNK, CLS, SEP)


def load_tokenizer(path: str | os.PathLike) -> BertTokenizerFast:
    """Load a BERT tokenizer from a local HF directory, a `vocab.txt` file or a `tokenizer.json` file.

    A `vocab.txt` on its own is read as an uncased BERT vocabulary (the BERT default); a
    directory carries its own casing in `tokenizer_config.json`.
    """
    source = Path(path)
    if not source.exists():
        raise DataError(
            f"tokenizer {source}: no such file or directory (pass a local HF directory, "
            "vocab.txt or tokenizer.json; nothing is downloaded)"
        )
    try:
        if source.is_dir():
            tokenizer = _load_directory(source)
        elif source.suffix == ".json":
            tokenizer = _wrap(Tokenizer.from_file(str(source)), source)
        else:
            tokenizer = _wrap(_wordpiece_from_vocab_file(source), source)
    except DataError:
        raise
    except Exception as error:  # tokenizers and transformers raise many types for a bad file
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"tokenizer {source}: cannot be read as a BERT tokenizer ({reason})") from error
    _check_special_tokens(tokenizer, source)
    return tokenizer


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike
) -> BertTokenizerFast:
    """Train an uncased BERT WordPiece vocabulary on `texts` and save it to `out_dir`.

    The result reloads with `load_tokenizer(out_dir)`. Special tokens come first, so [PAD] has
    id 0, then every character seen (alone and as a `##` continuation), then the learned
    pieces. The same texts always give the same vocabulary. It may end up smaller than
    `vocab_size` when the texts are few.
    """
    texts = list(texts)
    learner = _bert_pipeline(Tokenizer(WordPiece(unk_token=UNK)))
    seen = set(_alphabet(learner, texts, ascii_too=False))
    alphabet = _alphabet(learner, texts)
    # The trainer numbers characters in hash-map order, so merges of equal count tie-break
    # differently from run to run; reserving the alphabet's ids up front makes it deterministic.
    # Punctuation is split off before WordPiece runs, so ASCII punctuation never continues a word.
    continued = [char for char in alphabet if char not in string.punctuation or char in seen]
    reserved = [*SPECIAL_TOKENS, *alphabet, *(f"##{char}" for char in continued)]
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=reserved, show_progress=False)
    learner.train_from_iterator(texts, trainer=trainer)
    # Rebuild from the learned vocabulary, so that only BERT's own special tokens stay special.
    vocab = learner.get_vocab(with_added_tokens=False)
    backend = _bert_pipeline(Tokenizer(WordPiece(vocab, unk_token=UNK)))
    tokenizer = _wrap(backend, Path(out_dir))
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def _alphabet(learner: Tokenizer, texts: list[str], ascii_too: bool = True) -> list[str]:
    """Every character of the normalised texts but whitespace (which pre-tokenising drops),
    and of lowercase ASCII text, sorted.

    The vocabulary learnt on pre-training captions also tokenises every task's text: a word
    the captions never use is spelled out in pieces, never lost as [UNK].
    """
    chars = set(string.ascii_lowercase + string.digits + string.punctuation) if ascii_too else set()
    for text in texts:
        chars.update(learner.normalizer.normalize_str(text))
    return sorted(char for char in chars if not char.isspace())


def save_tokenizer(tokenizer: BertTokenizerFast, out_dir: str | os.PathLike) -> Path:
    """Save `tokenizer` in HF format plus a plain `vocab.txt` (which any BERT tool can read)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    vocab_file = out / "vocab.txt"
    if not vocab_file.exists():
        by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        # A line number is an id, so only a gap-free vocabulary can be written this way.
        if [index for _, index in by_id] == list(range(len(by_id))):
            lines = "".join(f"{token}\n" for token, _ in by_id)
            vocab_file.write_text(lines, encoding="utf-8")
    return out


def _load_directory(directory: Path) -> BertTokenizerFast:
    if not (directory / "vocab.txt").is_file() and not (directory / "tokenizer.json").is_file():
        raise DataError(f"tokenizer {directory}: directory has neither vocab.txt nor tokenizer.json")
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def _wordpiece_from_vocab_file(vocab_file: Path) -> Tokenizer:
    lines = vocab_file.read_text(encoding="utf-8").splitlines()
    vocab: dict[str, int] = {}
    for token in lines:
        vocab.setdefault(token, len(vocab))
    if len(vocab) != len(lines):
        raise DataError(f"tokenizer {vocab_file}: vocabulary lists a token twice")
    missing = [token for token in REQUIRED_TOKENS if token not in vocab]
    if missing:
        raise DataError(f"tokenizer {vocab_file}: vocabulary lacks {', '.join(missing)}")
    return _bert_pipeline(Tokenizer(WordPiece(vocab, unk_token=UNK)))


def _bert_pipeline(backend: Tokenizer) -> Tokenizer:
    """Give a WordPiece model BERT's uncased normaliser, splitter and decoder."""
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


def _wrap(backend: Tokenizer, source: Path) -> BertTokenizerFast:
    vocab = backend.get_vocab()
    missing = [token for token in REQUIRED_TOKENS if token not in vocab]
    if missing:
        raise DataError(f"tokenizer {source}: vocabulary lacks {', '.join(missing)}")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0",
        pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])],
    )
    from transformers import BertTokenizerFast

    return BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=True,
        unk_token=UNK,
        sep_token=SEP,
        pad_token=PAD,
        cls_token=CLS,
        mask_token=MASK if MASK in vocab else None,
    )


def _check_special_tokens(tokenizer: BertTokenizerFast, source: Path) -> None:
    for name in ("pad_token_id", "cls_token_id", "sep_token_id", "unk_token_id"):
        if getattr(tokenizer, name) is None:
            raise DataError(f"tokenizer {source}: has no {name.removesuffix('_id')}")
