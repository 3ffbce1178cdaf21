"""Scoring: retrieval reuses each encoded image and caption, so it must rank as the full model
does; captions are generated in batches, so each must be what its image alone gets."""

import pytest
import torch

from evlm_cli.core.config import DataConfig, PairsConfig
from evlm_cli.data.loader import PreparedData
from evlm_cli.data.prepare import prepare, prepare_pairs
from evlm_cli.models.config import make_config
from evlm_cli.models.generate import beam_search, greedy_decode
from evlm_cli.models.vlm import VLM
from evlm_cli.recipe.scoring import (
    decoder_ids,
    evaluate_report,
    generate_captions,
    retrieval_recalls,
    retrieval_scores,
)
from evlm_cli.tasks.caption import prompt_ids
from evlm_cli.tasks.retrieval import rerank_top_k, retrieval_metrics


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    prepare_pairs(PairsConfig(source="easy-vqa", train=(), image_root=None, image_size=16,
                              max_text_len=16, limit=40, val_fraction=0.1, tokenizer=None,
                              vocab_size=100, storage="auto", skip_bad_images=False), 0, out)
    return PreparedData(out)


def test_retrieval_recalls_equal_a_full_forward_per_pair(pairs):
    split = pairs.split("val")
    torch.manual_seed(0)
    model = VLM(make_config(vision=dict(layers=1, width=16, heads=2, ffn=32),
                            text=dict(layers=1, width=16, heads=2, ffn=32),
                            fusion=dict(layers=1, width=16, heads=2, ffn=32), image_size=16,
                            patch_size=8, vocab_size=pairs.meta["vocab_size"], max_positions=16,
                            heads=["itc", "itm"], embed_dim=8, pool="max")).eval()
    rows = split.image_index
    images, text_to_image = torch.unique(rows, sorted=True, return_inverse=True)
    batch = split.gather(torch.arange(len(split)))
    with torch.no_grad():
        pictures = split.images_of(images)
        vision = model.vision(pictures).last
        text = model.encode_text(batch["input_ids"], batch["attention_mask"]).last
        sim = model.similarity(vision, text)

        def itm(image_index, text_index):  # every pair through the whole model, from scratch
            out = model(pictures[image_index], batch["input_ids"][text_index],
                        batch["attention_mask"][text_index])
            return model.logits("retrieval", out)[:, 1]

        def itm_plus_itc(image_index, text_index):
            return itm(image_index, text_index) + sim[image_index, text_index]

        expected_itc = retrieval_metrics(sim, sim.t(), text_to_image)
        expected_itm = retrieval_metrics(*rerank_top_k(sim, 3, itm), text_to_image)
        expected_scores = {"itm": rerank_top_k(sim, 3, itm),
                           "itm+itc": rerank_top_k(sim, 3, itm_plus_itc)}
    assert len(images) >= 4 and len(split) > len(images)  # several captions per image
    got_itc = retrieval_recalls(model, split, 7, torch.device("cpu"), 0)
    got_itm = retrieval_recalls(model, split, 7, torch.device("cpu"), 3)
    assert got_itc == pytest.approx(expected_itc, abs=1e-6)
    assert got_itm == pytest.approx(expected_itm, abs=1e-6)
    for rerank, (i2t, t2i) in expected_scores.items():  # the match logit alone by default
        got_i2t, got_t2i, _ = retrieval_scores(model, split, 7, torch.device("cpu"), 3, rerank)
        assert torch.allclose(got_i2t, i2t, atol=1e-5) and torch.allclose(got_t2i, t2i, atol=1e-5)
    assert not torch.allclose(expected_scores["itm"][0], expected_scores["itm+itc"][0])
    assert got_itm != got_itc  # re-ranking changed something, so the check above has teeth


@pytest.fixture(scope="module")
def captioning(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("captioning")
    prepare(DataConfig(source="easy-vqa", train=(), val=(), test=(), image_root=None,
                       answer_list=None, image_size=16, max_text_len=16, limit=12,
                       val_fraction=0.1, storage="auto", skip_bad_images=False,
                       caption_prompt="", vqa_loss="bce"), "captioning", 0, out, pairs.directory / "tokenizer")
    return PreparedData(out)


def caption_model(data: PreparedData) -> VLM:
    torch.manual_seed(0)
    return VLM(make_config(vision=dict(layers=1, width=16, heads=2, ffn=32),
                           text=dict(layers=1, width=16, heads=2, ffn=32),
                           fusion=dict(layers=1, width=16, heads=2, ffn=32), image_size=16,
                           patch_size=8, vocab_size=data.meta["vocab_size"], max_positions=16,
                           heads=["mlm"], embed_dim=8)).eval()


def test_each_image_gets_the_caption_it_would_get_alone(captioning):
    model, cpu = caption_model(captioning), torch.device("cpu")
    references = captioning.references("val")
    batched = generate_captions(model, captioning, "val", 5, cpu, max_len=6)
    assert sorted(batched) == sorted(references) and len(batched) > 5  # several batches
    assert len(set(batched.values())) > 1  # images get different captions: a mix-up would show
    tokenizer = captioning.tokenizer()
    split = captioning.split("val")
    for row, caption in batched.items():
        tokens = greedy_decode(model, split.images_of(torch.tensor([row])),
                               bos_id=tokenizer.cls_token_id, eos_id=tokenizer.sep_token_id,
                               pad_id=tokenizer.pad_token_id, max_len=6)
        assert caption == tokenizer.decode(tokens[0], skip_special_tokens=True)
    for rule in ("xvlm", "fairseq"):
        beams = generate_captions(model, captioning, "val", 5, cpu, beam_size=3, max_len=6,
                                  beam_rule=rule)
        for row, caption in beams.items():
            tokens = beam_search(model, split.images_of(torch.tensor([row])), beam_size=3,
                                 rule=rule, bos_id=tokenizer.cls_token_id,
                                 eos_id=tokenizer.sep_token_id, pad_id=tokenizer.pad_token_id,
                                 max_len=6)
            assert caption == tokenizer.decode(tokens[0], skip_special_tokens=True)


def prompted(data: PreparedData, prompt: str) -> PreparedData:
    """The same prepared data, its meta saying that its captions begin with `prompt`."""
    again = PreparedData(data.directory)
    again.meta["caption_prompt_ids"] = prompt_ids(again.tokenizer(), prompt)
    return again


def test_captions_are_written_after_the_prepared_prompt_and_without_it(captioning):
    data = prompted(captioning, "a picture of ")
    tokenizer, split = data.tokenizer(), data.split("val")
    prompt = data.meta["caption_prompt_ids"]
    assert len(prompt) > 3  # this vocabulary spells "picture" in pieces
    ids = decoder_ids(data)
    assert ids["prompt_ids"] == prompt
    assert ids["max_len"] == data.meta["max_text_len"] - 1 - len(prompt)
    model, cpu = caption_model(data), torch.device("cpu")
    captions = generate_captions(model, data, "val", 5, cpu, max_len=6)
    for row, caption in captions.items():
        tokens = greedy_decode(model, split.images_of(torch.tensor([row])), max_len=6,
                               **{k: v for k, v in ids.items() if k != "max_len"})
        assert caption == tokenizer.decode(tokens[0], skip_special_tokens=True)
        assert not caption.startswith("a picture of")
    assert captions != generate_captions(model, captioning, "val", 5, cpu, max_len=6)


def test_decoding_blocks_every_special_token_but_the_end_only_when_asked(captioning):
    tokenizer = captioning.tokenizer()
    assert decoder_ids(captioning)["blocked_ids"] == []
    blocked = decoder_ids(captioning, block_special_tokens=True)["blocked_ids"]
    assert sorted(blocked) == sorted({tokenizer.pad_token_id, tokenizer.unk_token_id,
                                      tokenizer.cls_token_id, tokenizer.mask_token_id})
    assert decoder_ids(captioning, min_len=2)["min_len"] == 2


def test_the_caption_report_headlines_the_chosen_metric(captioning):
    model, cpu = caption_model(captioning), torch.device("cpu")
    report = evaluate_report(model, captioning, "val", "captioning", 8, cpu, metric="bleu",
                             max_len=6, meteor=False)
    assert report["value"] == report["scores"]["bleu_4"] != report["scores"]["cider"]
    assert "meteor" not in report["scores"] and {"cider", "rouge_l"} <= set(report["scores"])
