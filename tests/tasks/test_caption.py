"""Caption targets and loss (the prompt left out, label smoothing as torch defines it), the prompt's
tokens with a trained WordPiece and a BERT tokenizer, and caption metrics checked against
pycocoevalcap and by hand."""

import math
import random
import subprocess
import tempfile
import threading

import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from evlm_cli.core.errors import DataError
from evlm_cli.core.packaged import local_path
from evlm_cli.data.tokenizer import load_tokenizer, train_wordpiece
from evlm_cli.tasks import caption
from evlm_cli.tasks.caption import (
    IGNORE,
    CaptionLoss,
    caption_metrics,
    check_prompted,
    lm_labels,
    lm_loss,
    prompt_ids,
)

CLS, SEP, PAD = 101, 102, 0

# Capitals and punctuation, so the results depend on the PTB tokenisation. Every caption has at
# least 4 words: shorter ones have no 4-grams, and pycocoevalcap's BLEU-4 of a perfect 3-word
# caption is about 0.03, its epsilons standing in for 0/0.
REFERENCES = {
    139: [
        "A man is riding a brown horse on the beach.",
        "Someone rides a horse along the sandy shore.",
        "A rider and his horse at the sea.",
    ],
    285: [
        "Two cats sleep on a red sofa.",
        "A pair of cats napping on the couch!",
        "Two kittens curled up, asleep, on a sofa.",
    ],
    632: [
        "A plate of pasta with tomato sauce.",
        "Spaghetti and sauce on a white plate.",
        "A dish of noodles, topped with red sauce.",
    ],
    724: [
        "A child flies a kite in the park.",
        "A young girl flying a kite on the grass.",
        "Kid with a kite at the park, on a windy day.",
    ],
    776: [
        "Three people wait at a bus stop.",
        "People are waiting for the bus in the rain.",
        "A group of commuters at the bus stop.",
    ],
}
PREDICTIONS = {
    139: "A man riding a horse on the beach.",
    285: "Two cats sleeping on a sofa.",
    632: "A plate of spaghetti with sauce.",
    724: "A child is flying a kite in the park!",
    776: "People waiting at a bus stop.",
}


class FakeMeteor:
    """Stands in for pycocoevalcap's Meteor, whose JVM takes seconds to load its paraphrase
    tables: a cheap process to close, a lock like Meteor's, and a fixed score."""

    def __init__(self) -> None:
        self.meteor_p = subprocess.Popen(
            ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.lock = threading.Lock()
        started.append(self)

    def compute_score(self, gts, res):
        return 0.25, [0.25] * len(gts)


class FailingMeteor(FakeMeteor):
    def compute_score(self, gts, res):
        self.lock.acquire()  # as Meteor does, which never releases it when the JVM dies
        raise BrokenPipeError(32, "Broken pipe")


started: list = []


@pytest.fixture
def fake_meteor(monkeypatch):
    """The Meteor instances caption_metrics starts, which are fakes during the test."""
    started.clear()
    monkeypatch.setattr(caption, "Meteor", FakeMeteor)
    return started


@pytest.fixture(scope="module")
def scored():
    """caption_metrics on PREDICTIONS with the real METEOR, run once, and its Meteor instances."""
    recorded = []

    class RecordedMeteor(Meteor):
        def __init__(self) -> None:
            super().__init__()
            recorded.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(caption, "Meteor", RecordedMeteor)
        return caption_metrics(PREDICTIONS, REFERENCES), recorded


def test_lm_labels_shift_onto_real_next_tokens():
    input_ids = torch.tensor(
        [
            [CLS, 7, 8, 9, SEP],
            [CLS, 7, SEP, PAD, PAD],
            [CLS, SEP, PAD, PAD, PAD],  # an empty caption: [CLS] learns to end at once
        ]
    )
    expected = torch.tensor(
        [
            [7, 8, 9, SEP, IGNORE],
            [7, SEP, IGNORE, IGNORE, IGNORE],
            [SEP, IGNORE, IGNORE, IGNORE, IGNORE],
        ]
    )
    labels = lm_labels(input_ids, (input_ids != PAD).long())
    assert labels.dtype == torch.long
    assert torch.equal(labels, expected)


def test_lm_loss_is_cross_entropy_over_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[3, 1, IGNORE, IGNORE], [5, IGNORE, IGNORE, IGNORE]])
    picked = torch.stack([logits[0, 0], logits[0, 1], logits[1, 0]])
    targets = torch.tensor([3, 1, 5])
    assert torch.allclose(lm_loss(logits, labels), F.cross_entropy(picked, targets))
    assert torch.allclose(
        lm_loss(logits, labels, label_smoothing=0.1),
        F.cross_entropy(picked, targets, label_smoothing=0.1),
    )

    changed = logits.clone()
    changed[labels == IGNORE] = 50 * torch.randn(5, 6)
    assert torch.allclose(lm_loss(changed, labels), lm_loss(logits, labels))


def test_the_prompt_is_given_not_learnt():
    """Prompt "p q": the positions that would predict it are IGNORE, the caption's are as
    without a prompt, and no logit at a prompt position moves the loss."""
    p, q = 30, 31
    input_ids = torch.tensor([[CLS, p, q, 7, 8, SEP], [CLS, p, q, 9, SEP, PAD]])
    mask = (input_ids != PAD).long()
    labels = lm_labels(input_ids, mask, prompt_length=2)
    assert torch.equal(labels, torch.tensor([[IGNORE, IGNORE, 7, 8, SEP, IGNORE],
                                             [IGNORE, IGNORE, 9, SEP, IGNORE, IGNORE]]))
    assert torch.equal(labels[:, 2:], lm_labels(input_ids, mask)[:, 2:])

    torch.manual_seed(0)
    logits = torch.randn(2, 6, SEP + 1)
    loss = CaptionLoss(prompt_length=2, label_smoothing=0.1)
    batch = {"input_ids": input_ids, "attention_mask": mask}
    changed = logits.clone()
    changed[:, :2] = 50 * torch.randn(2, 2, SEP + 1)
    assert torch.allclose(loss.loss(changed, loss.targets(batch)),
                          loss.loss(logits, loss.targets(batch)))
    unprompted = CaptionLoss(prompt_length=0, label_smoothing=0.1)
    assert not torch.allclose(unprompted.loss(changed, unprompted.targets(batch)),
                              unprompted.loss(logits, unprompted.targets(batch)))


def test_a_prompt_that_leaves_no_caption_is_refused():
    input_ids = torch.tensor([[CLS, 30, SEP]])
    with pytest.raises(ValueError, match="no caption token"):
        lm_labels(input_ids, torch.ones_like(input_ids), prompt_length=2)


@pytest.mark.parametrize("smoothing", [0.1, 0.3])
def test_label_smoothing_spreads_the_share_over_the_vocabulary(smoothing):
    """(1 - e) of the label's cross-entropy plus e of the mean over all V tokens: torch's
    `label_smoothing`. X-VLM's LabelSmoothSoftmaxCEV1 gives the label 1 - e but not its own
    e / V of the spread, so it is lower by e / V of the plain cross-entropy."""
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 7)
    labels = torch.tensor([[4, 2, IGNORE], [6, IGNORE, IGNORE]])
    rows, targets = logits[labels != IGNORE], labels[labels != IGNORE]
    log_probs = rows.log_softmax(-1)
    nll = -log_probs.gather(1, targets[:, None]).squeeze(1)
    by_hand = ((1 - smoothing) * nll - smoothing * log_probs.mean(-1)).mean()
    smoothed = CaptionLoss(prompt_length=0, label_smoothing=smoothing).loss(logits, labels)
    assert torch.allclose(smoothed, by_hand)
    assert torch.allclose(smoothed, F.cross_entropy(rows, targets, label_smoothing=smoothing))
    assert smoothed > lm_loss(logits, labels) + 1e-3  # smoothing costs a confident-free model

    vocab = logits.shape[-1]
    xvlm_target = torch.full_like(log_probs, smoothing / vocab)
    xvlm_target[torch.arange(len(targets)), targets] = 1 - smoothing
    xvlm = (-(xvlm_target * log_probs).sum(-1)).mean()
    assert torch.allclose(smoothed - xvlm, smoothing / vocab * nll.mean())


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """A WordPiece trained on easy-VQA-like captions (it spells "picture" in pieces) and the
    packaged BERT vocabulary (all-MiniLM-L6-v2's)."""
    captions = ["a small red circle in the top left", "there is a large blue triangle on the "
                "right of the image", "the image contains a medium square at the bottom"] * 20
    trained = train_wordpiece(captions, 120, tmp_path_factory.mktemp("wordpiece"))
    return {"wordpiece": trained, "bert": load_tokenizer(local_path("minilm"))}


@pytest.mark.parametrize("name", ["wordpiece", "bert"])
def test_prompted_captions_begin_with_the_prompts_tokens(tokenizers, name):
    tokenizer = tokenizers[name]
    prompt = "a picture of "
    ids = prompt_ids(tokenizer, prompt)
    assert tokenizer.decode(ids) == "a picture of"
    assert CLS not in ids and tokenizer.cls_token_id not in ids
    assert tokenizer.sep_token_id not in ids
    if name == "bert":
        assert len(ids) == 3  # X-VLM's prompt is three BERT tokens
    encoded = torch.tensor(tokenizer([prompt + "a small red circle", prompt + "a square"],
                                     padding=True)["input_ids"])
    check_prompted(encoded, tokenizer.cls_token_id, ids, "captioning.prompt")
    assert prompt_ids(tokenizer, "") == []


@pytest.mark.parametrize("name", ["wordpiece", "bert"])
def test_a_prompt_that_runs_into_the_caption_is_refused(tokenizers, name):
    tokenizer = tokenizers[name]
    ids = prompt_ids(tokenizer, "a small re")  # cut inside "red"
    encoded = torch.tensor(tokenizer(["a small re" + "d circle"])["input_ids"])
    with pytest.raises(DataError, match="captioning.prompt: 1 captions do not begin"):
        check_prompted(encoded, tokenizer.cls_token_id, ids, "captioning.prompt")


def test_a_text_length_with_no_room_after_the_prompt_is_refused():
    with pytest.raises(DataError, match="leaves no room"):
        check_prompted(torch.tensor([[CLS, 30, 31]]), CLS, [30, 31], "data.max_text_len")


def test_lm_loss_refuses_a_batch_without_labels():
    with pytest.raises(ValueError, match="labelled"):
        lm_loss(torch.randn(1, 3, 6), torch.full((1, 3), IGNORE))


@pytest.mark.e2e  # METEOR's JVM: 10-30 s to load its tables
def test_metrics_match_pycocoevalcap_called_directly(scored):
    metrics, _ = scored
    # pycocoevalcap's own pipeline with string ids in a shuffled order, so neither the type
    # nor the order of the ids may change a value.
    ids = list(REFERENCES)
    random.Random(0).shuffle(ids)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({str(i): [{"caption": c} for c in REFERENCES[i]] for i in ids})
    res = tokenizer.tokenize({str(i): [{"caption": PREDICTIONS[i]}] for i in reversed(ids)})
    bleus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    scorer = Meteor()  # its own JVM, stopped here rather than whenever it is collected
    try:
        meteor, _ = scorer.compute_score(gts, res)
    finally:
        with scorer.lock:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()

    assert 0.1 < metrics["bleu_4"] < 0.9  # neither degenerate nor perfect
    for n, bleu in enumerate(bleus, start=1):
        assert metrics[f"bleu_{n}"] == pytest.approx(bleu, abs=1e-9)
    assert metrics["cider"] == pytest.approx(cider, abs=1e-9)
    assert metrics["rouge_l"] == pytest.approx(rouge, abs=1e-9)
    assert metrics["meteor"] == pytest.approx(meteor, abs=1e-9)
    assert 0.1 < metrics["meteor"] < 0.9
    assert set(metrics) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}

    # The tokenisation matters here: raw captions score differently.
    raw_gts = {i: REFERENCES[i] for i in ids}
    raw_bleus, _ = Bleu(4).compute_score(raw_gts, {i: [PREDICTIONS[i]] for i in ids}, verbose=0)
    assert abs(raw_bleus[3] - metrics["bleu_4"]) > 0.01


@pytest.mark.e2e  # METEOR's JVM: 10-30 s to load its tables
def test_meteor_process_is_closed(scored):
    _, meteors = scored
    assert len(meteors) == 1
    assert meteors[0].meteor_p.returncode is not None
    assert not meteors[0].lock.locked()


def test_meteor_process_is_closed_when_scoring_fails(monkeypatch):
    started.clear()
    monkeypatch.setattr(caption, "Meteor", FailingMeteor)
    with pytest.raises(BrokenPipeError):
        caption_metrics(PREDICTIONS, REFERENCES)
    assert started[0].meteor_p.returncode is not None
    # Meteor.__del__ takes the lock, so a held one would hang garbage collection.
    assert not started[0].lock.locked()


def test_bleu_4_by_hand(fake_meteor):
    references = {
        7: [
            "A man is riding his brown horse on the beach.",
            "Someone rides a horse along the sandy shore, slowly.",
        ]
    }
    # Tokenised: "a man riding a horse on the beach", 8 words against references of 10 and 9.
    # 1-grams: "a" twice, clipped to 1 (each reference has one); man riding horse on the beach
    #          match: 7/8
    # 2-grams: a man, a horse, horse on, on the, the beach match; man riding, riding a don't: 5/7
    # 3-grams: horse on the, on the beach match, of 6: 2/6
    # 4-grams: horse on the beach matches, of 5: 1/5
    # Brevity penalty: the closest reference length is 9, longer than 8: exp(1 - 9/8).
    expected = (7 / 8 * 5 / 7 * 2 / 6 * 1 / 5) ** (1 / 4) * math.exp(1 - 9 / 8)
    metrics = caption_metrics({7: "A man riding a horse on the beach."}, references)
    assert metrics["bleu_4"] == pytest.approx(expected, abs=1e-6)
    assert metrics["bleu_1"] == pytest.approx(7 / 8 * math.exp(1 - 9 / 8), abs=1e-6)


def test_a_perfect_caption_scores_top_and_beats_one_on_the_wrong_image(fake_meteor):
    # Line breaks inside captions would shift every later caption onto the wrong image in
    # the Java tokenizer, unless caption_metrics joins the lines first.
    perfect = {i: refs[0].replace(" ", "\r\n", 1) for i, refs in REFERENCES.items()}
    perfect[285] = REFERENCES[285][0].replace(" ", "\u2028")
    ids = list(REFERENCES)
    wrong_image = {i: REFERENCES[ids[(k + 1) % len(ids)]][0] for k, i in enumerate(ids)}

    best = caption_metrics(perfect, REFERENCES)
    assert best["bleu_4"] > 0.99
    assert best["rouge_l"] > 0.99
    assert best["cider"] > caption_metrics(wrong_image, REFERENCES)["cider"] + 1
    assert all(meteor.meteor_p.returncode is not None for meteor in fake_meteor)


@pytest.mark.parametrize(
    "predictions",
    [
        {i: PREDICTIONS[i] for i in list(PREDICTIONS)[:-1]},  # 776 missing
        {**PREDICTIONS, 999: "an extra caption"},
        {str(776) if i == 776 else i: c for i, c in PREDICTIONS.items()},  # "776" is not 776
    ],
)
def test_mismatched_ids_are_refused(predictions, fake_meteor):
    with pytest.raises(ValueError, match="999|776"):
        caption_metrics(predictions, REFERENCES)
    assert fake_meteor == []  # refused before any scoring


def test_missing_java_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DataError, match="Java"):
        caption_metrics(PREDICTIONS, REFERENCES)


def test_unwritable_tokenizer_folder_is_a_data_error(monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(DataError, match="writable"):
        caption_metrics(PREDICTIONS, REFERENCES)
