"""Batches from a prepared directory: dtypes, normalisation, order, sharding across ranks, NLVR2's
image pairs and captioning's references."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evlm_cli.core.config import DataConfig, build
from evlm_cli.core.errors import DataError
from evlm_cli.data.loader import PreparedData, PreparedSplit
from evlm_cli.data.prepare import prepare

COUNT, SIZE = 37, 16  # an odd count, so sharding needs padding


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, easy_vqa_tokenizer):
    out = tmp_path_factory.mktemp("prepared")
    data = {
        "source": "easy-vqa", "train": None, "val": None, "test": None, "image_root": None,
        "answer_list": None, "image_size": SIZE, "max_text_len": 12, "limit": COUNT,
        "val_fraction": 0.1, "storage": "auto", "skip_bad_images": False, "caption_prompt": "", "vqa_loss": "bce",
    }
    prepare(build(DataConfig, data), "vqa", 3, out, easy_vqa_tokenizer)
    return out


def test_batch_contents(prepared):
    split = PreparedData(prepared).split("train")
    assert len(split) == COUNT
    batch = next(split.batches(batch_size=8))
    assert batch["images"].dtype == torch.float32 and batch["images"].shape == (8, 3, SIZE, SIZE)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (8, 12)
    assert batch["attention_mask"].dtype == torch.long
    assert batch["targets"].dtype == torch.float32 and batch["targets"].shape == (8, 13)
    assert batch["question_id"].dtype == torch.long
    raw = load_file(prepared / "train.safetensors")
    images = load_file(prepared / "images.safetensors")["images"]
    expected = (images[raw["image_index"][:8]].float() / 255 - 0.5) / 0.5
    assert torch.allclose(batch["images"], expected, atol=1e-6)
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    assert torch.equal(batch["question_id"], raw["question_id"][:8])
    item = split.gather(torch.tensor([2]))
    assert torch.equal(item["input_ids"][0], batch["input_ids"][2])


def test_epoch_covers_every_example_once(prepared):
    split = PreparedSplit(prepared, "val")
    seen = torch.cat([b["question_id"] for b in split.batches(batch_size=5, shuffle=True, seed=1)])
    assert sorted(seen.tolist()) == sorted(split.question_id.tolist())
    assert split.num_batches(5) == 8 and split.num_batches(5, drop_last=True) == 7
    assert len(list(split.batches(batch_size=5, drop_last=True))) == 7


def test_shuffle_depends_on_seed_and_epoch(prepared):
    split = PreparedSplit(prepared, "train")
    order = split.shard_indices(shuffle=True, seed=0, epoch=0)
    assert torch.equal(order, split.shard_indices(shuffle=True, seed=0, epoch=0))
    assert not torch.equal(order, split.shard_indices(shuffle=True, seed=0, epoch=1))
    assert not torch.equal(order, split.shard_indices(shuffle=True, seed=1, epoch=0))
    assert torch.equal(split.shard_indices(shuffle=False), torch.arange(COUNT))


def test_shards_are_equal_and_cover_all(prepared):
    split = PreparedSplit(prepared, "test")
    shards = [split.shard_indices(True, seed=0, epoch=2, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 19  # 37 padded to 38
    assert set(torch.cat(shards).tolist()) == set(range(COUNT))
    steps = [len(list(split.batches(4, True, 0, 2, rank=r, world_size=2))) for r in range(2)]
    assert steps == [5, 5]
    with pytest.raises(ValueError):
        split.shard_indices(False, rank=2, world_size=2)


def test_answer_balance_weights_and_weighted_order(prepared):
    split = PreparedSplit(prepared, "test")
    top = split.targets.float().argmax(1)
    counts = torch.bincount(top).double()
    assert torch.equal(split.answer_weights(0.0), torch.ones(COUNT, dtype=torch.float64))
    balanced = split.answer_weights(1.0)
    # fully balanced: every answer present carries the same total weight
    per_answer = torch.zeros_like(counts).index_add_(0, top, balanced)[counts > 0]
    assert torch.allclose(per_answer, torch.ones_like(per_answer))
    order = split.shard_indices(True, seed=0, epoch=0, weights=balanced)
    assert len(order) == COUNT and torch.equal(order, split.shard_indices(True, 0, 0, weights=balanced))
    assert not torch.equal(order, split.shard_indices(True, 0, 1, weights=balanced))
    only = torch.zeros(COUNT, dtype=torch.float64)
    only[5] = 1.0
    assert set(split.shard_indices(True, 0, 0, weights=only).tolist()) == {5}
    with pytest.raises(ValueError, match="not all zero"):
        split.shard_indices(True, 0, 0, weights=torch.zeros(COUNT))
    with pytest.raises(ValueError, match="answer balance"):
        split.answer_weights(1.5)


def test_missing_split(prepared, tmp_path):
    with pytest.raises(DataError, match="no split 'dev'"):
        PreparedData(prepared).split("dev")
    with pytest.raises(DataError, match="meta.json: missing"):
        PreparedData(tmp_path)


def test_images_are_normalised_with_the_mean_and_std_prepare_recorded(prepared, tmp_path):
    import json
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta.update(pixel_mean=[0.4, 0.5, 0.6], pixel_std=[0.2, 0.25, 0.3])
    (copy / "meta.json").write_text(json.dumps(meta))
    split = PreparedData(copy).split("train")
    raw = load_file(copy / "train.safetensors")
    pixels = load_file(copy / "images.safetensors")["images"][raw["image_index"][:4]].float() / 255
    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(3, 1, 1)
    assert torch.allclose(split.gather(torch.arange(4))["images"], (pixels - mean) / std, atol=1e-5)


# NLVR2 pairs and caption references, from tiny X-VLM JSON -------------------------------------

PAIR_COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def prepare_xvlm(tmp_path, task, entries, tokenizer):
    """Prepare `entries` (the same list as train, val and test) for `task` from four plain images."""
    root = tmp_path / "images"
    root.mkdir()
    for index, color in enumerate(PAIR_COLORS):
        Image.new("RGB", (SIZE, SIZE), color).save(root / f"{index}.png")
    file = tmp_path / "entries.json"
    file.write_text(json.dumps(entries))
    data = {
        "source": "xvlm-json", "train": [str(file)], "val": [str(file)], "test": [str(file)],
        "image_root": str(root), "answer_list": None, "image_size": SIZE, "max_text_len": 8,
        "limit": None, "val_fraction": 0.1, "storage": "auto", "skip_bad_images": False,
        "caption_prompt": "", "vqa_loss": "bce",
    }
    out = tmp_path / "prepared"
    prepare(build(DataConfig, data), task, 0, out, tokenizer)
    return out


def test_nlvr2_batches_carry_both_images(tmp_path, easy_vqa_tokenizer):
    pairs = [(0, 1), (1, 0), (2, 3), (3, 0), (1, 2)]
    entries = [{"images": [f"{left}.png", f"{right}.png"], "sentence": "is it red?",
                "label": index % 2 == 0} for index, (left, right) in enumerate(pairs)]
    split = PreparedData(prepare_xvlm(tmp_path, "nlvr2", entries, easy_vqa_tokenizer)).split("val")
    assert len(split) == 5
    batch = split.gather(torch.tensor([0, 3, 4]))
    assert batch["images"].shape == (3, 2, 3, SIZE, SIZE) and batch["images"].dtype == torch.float32
    assert batch["image_index"].shape == (3, 2)
    assert batch["targets"].shape == (3, 2) and batch["targets"].argmax(1).tolist() == [1, 0, 1]
    assert batch["question_id"].tolist() == [0, 3, 4]
    # each image slot shows its image: red is (1, -1, -1) normalised, and so on
    expected = torch.tensor([PAIR_COLORS[i] for pair in (pairs[0], pairs[3], pairs[4]) for i in pair])
    shown = batch["images"].mean(dim=(3, 4)).reshape(6, 3)
    assert torch.allclose(shown, expected / 127.5 - 1, atol=1e-6)
    assert torch.equal(split.images_of(batch["image_index"][:, 0]), batch["images"][:, 0])
    assert split.gather(torch.tensor([1]))["images"].shape == (1, 2, 3, SIZE, SIZE)
    sizes = [len(b["targets"]) for b in split.batches(batch_size=2, shuffle=True, seed=0)]
    assert sizes == [2, 2, 1]


def test_references_come_back_by_image_row(tmp_path, easy_vqa_tokenizer, prepared):
    entries = [{"image": "2.png", "caption": ["a blue one", "blue"]},
               {"image": "0.png", "caption": ["a red one"]}]
    data = PreparedData(prepare_xvlm(tmp_path, "captioning", entries, easy_vqa_tokenizer))
    references = data.references("test")
    rows = data.split("test").image_index.tolist()
    assert references == {rows[0]: ["a blue one", "blue"], rows[2]: ["a red one"]}
    assert data.references("val") == references
    with pytest.raises(DataError, match=r"no reference captions for split 'train' \(has val, test\)"):
        data.references("train")
    with pytest.raises(DataError, match=r"references\.json: missing; .*captioning task only "
                                        r"\(this is 'vqa' data\)"):
        PreparedData(prepared).references("test")
