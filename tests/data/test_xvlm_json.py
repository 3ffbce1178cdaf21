import json
from pathlib import Path

import pytest

from evlm_cli.core.errors import DataError
from evlm_cli.data.xvlm_json import read_nlvr2, read_pairs, read_retrieval_eval, read_vqa

READERS = {"pairs": read_pairs, "eval": read_retrieval_eval}


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    (images / "coco").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "coco/c.jpg"):
        (images / name).write_bytes(b"not decoded by the readers")
    return images


def write(path: Path, entries) -> Path:
    path.write_text(json.dumps(entries))
    return path


def test_pairs_parse_strings_and_lists(tmp_path, root):
    first = write(tmp_path / "train.json", [
        {"image": "a.jpg", "caption": "a dog runs", "image_id": 7},
        {"image": "./coco/c.jpg", "caption": ["two cats", "cats on a sofa"]},
    ])
    second = write(tmp_path / "more.json", [{"image": "b.jpg", "caption": "a red car"}])
    records = read_pairs([first, second], root)
    assert records == [
        {"image": str(root / "a.jpg"), "caption": "a dog runs"},
        {"image": str(root / "coco/c.jpg"), "caption": "two cats"},
        {"image": str(root / "coco/c.jpg"), "caption": "cats on a sofa"},
        {"image": str(root / "b.jpg"), "caption": "a red car"},
    ]


def test_eval_keeps_every_caption_of_an_image(tmp_path, root):
    file = write(tmp_path / "test.json", [
        {"image": "a.jpg", "caption": ["a dog runs", "a dog on grass"], "image_id": 0},
        {"image": "b.jpg", "caption": "a red car"},
    ])
    assert read_retrieval_eval([file], root) == [
        {"image": str(root / "a.jpg"), "captions": ["a dog runs", "a dog on grass"]},
        {"image": str(root / "b.jpg"), "captions": ["a red car"]},
    ]


BAD_ENTRIES = [
    ("not an object", r"entry 1: expected an object, got str"),
    ({"caption": "x"}, r"entry 1: missing key 'image'"),
    ({"image": "b.jpg"}, r"entry 1: missing key 'caption'"),
    ({"image": 3, "caption": "x"}, r"entry 1: 'image' must be a string"),
    ({"image": "b.jpg", "caption": 5}, r"entry 1: 'caption' must be a string or a list"),
    ({"image": "b.jpg", "caption": ["x", None]}, r"entry 1: 'caption' must be a string or a list"),
    ({"image": "b.jpg", "caption": []}, r"entry 1: 'caption' is an empty list"),
    ({"image": "b.jpg", "caption": "  "}, r"entry 1: 'caption' holds an empty caption"),
    ({"image": "b.jpg", "caption": ["x", ""]}, r"entry 1: 'caption' holds an empty caption"),
]


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize(("entry", "message"), BAD_ENTRIES)
def test_bad_entry_names_file_and_index(tmp_path, root, reader, entry, message):
    file = write(tmp_path / "bad.json", [{"image": "a.jpg", "caption": "fine"}, entry])
    with pytest.raises(DataError, match=r"bad\.json: " + message):
        READERS[reader]([file], root)


@pytest.mark.parametrize("reader", READERS)
def test_bad_files_and_root(tmp_path, root, reader):
    read = READERS[reader]
    good = write(tmp_path / "good.json", [{"image": "a.jpg", "caption": "fine"}])
    with pytest.raises(DataError, match=r"image_root .*no_such_dir: no such directory"):
        read([good], tmp_path / "no_such_dir")
    with pytest.raises(DataError, match=r"nope\.json: no such file"):
        read([good, tmp_path / "nope.json"], root)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match=r"broken\.json: not valid JSON"):
        read([tmp_path / "broken.json"], root)
    with pytest.raises(DataError, match=r"dict\.json: expected a JSON list of entries, got dict"):
        read([write(tmp_path / "dict.json", {"image": "a.jpg"})], root)


def test_vqa_reader_checks_entries_too(tmp_path, root):
    file = write(tmp_path / "vqa.json", [
        {"image": "a.jpg", "question": "what?", "answer": ["x", "y"], "question_id": "4"},
        {"image": "gone.jpg", "question": "why?", "answer": "z", "question_id": 5},
    ])
    # whether an image exists is prepare's scan, which finds every bad image at once
    assert read_vqa([file], root, require_answers=True)[1]["image"] == str(root / "gone.jpg")
    write(file, [{"image": "a.jpg", "question": "what?", "question_id": 4}])
    assert read_vqa([file], root, require_answers=False) == [
        {"image": str(root / "a.jpg"), "question": "what?", "answers": [], "question_id": 4}
    ]
    with pytest.raises(DataError, match=r"vqa\.json: entry 0: missing key 'answer'"):
        read_vqa([file], root, require_answers=True)


def test_karpathy_caption_files_read_as_pairs_and_evaluation_images(tmp_path, root):
    # X-VLM's COCO Karpathy captioning files: a caption per train entry, a list per val/test
    # image, and an image_id the readers ignore.
    train = write(tmp_path / "coco_karpathy_train.json", [
        {"image": "coco/c.jpg", "caption": "two cats on a sofa", "image_id": "c"},
        {"image": "coco/c.jpg", "caption": "a pair of cats", "image_id": "c"},
        {"image": "a.jpg", "caption": "a dog runs", "image_id": "a"},
    ])
    test = write(tmp_path / "coco_karpathy_test.json", [
        {"image": "b.jpg", "caption": ["a red car", "a car parked", "a red vehicle"],
         "image_id": "b"},
    ])
    assert read_pairs([train], root) == [
        {"image": str(root / "coco/c.jpg"), "caption": "two cats on a sofa"},
        {"image": str(root / "coco/c.jpg"), "caption": "a pair of cats"},
        {"image": str(root / "a.jpg"), "caption": "a dog runs"},
    ]
    assert read_retrieval_eval([test], root) == [
        {"image": str(root / "b.jpg"), "captions": ["a red car", "a car parked", "a red vehicle"]},
    ]


# NLVR2 ----------------------------------------------------------------------------------------

def nlvr2_entry(label="True", images=("a.jpg", "b.jpg"), sentence="both dogs run"):
    return {"images": list(images), "sentence": sentence, "label": label,
            "identifier": "train-1-0-0"}


def test_nlvr2_reads_pairs_in_order_with_every_label_spelling(tmp_path, root):
    first = write(tmp_path / "nlvr2_train.json", [
        nlvr2_entry("True"),
        nlvr2_entry("False", images=("b.jpg", "./a.jpg")),
        nlvr2_entry(True, images=("coco/c.jpg", "a.jpg"), sentence="one cat"),
    ])
    second = write(tmp_path / "more.json", [nlvr2_entry(0), nlvr2_entry(1), nlvr2_entry(False),
                                            nlvr2_entry("true")])
    records = read_nlvr2([first, second], root)
    assert records[:3] == [
        {"images": [str(root / "a.jpg"), str(root / "b.jpg")], "sentence": "both dogs run",
         "label": True},
        {"images": [str(root / "b.jpg"), str(root / "a.jpg")], "sentence": "both dogs run",
         "label": False},
        {"images": [str(root / "coco/c.jpg"), str(root / "a.jpg")], "sentence": "one cat",
         "label": True},
    ]
    assert [record["label"] for record in records[3:]] == [False, True, False, True]


BAD_NLVR2_ENTRIES = [
    (nlvr2_entry("yes"), r"entry 1: 'label' must be \"True\" or \"False\" .*got 'yes'"),
    (nlvr2_entry(2), r"entry 1: 'label' must be .*got 2"),
    (nlvr2_entry(1.0), r"entry 1: 'label' must be .*got 1\.0"),
    (nlvr2_entry(None), r"entry 1: 'label' must be .*got None"),
    (nlvr2_entry(images=("a.jpg",)), r"entry 1: 'images' must list two images .*got 1"),
    (nlvr2_entry(images=("a.jpg", "b.jpg", "a.jpg")), r"entry 1: 'images' must list two .*got 3"),
    ({**nlvr2_entry(), "images": "a.jpg"}, r"entry 1: 'images' must be a list of two image paths"),
    (nlvr2_entry(images=("a.jpg", 4)), r"entry 1: 'images' must be a list of two image paths"),
    (nlvr2_entry(sentence=" "), r"entry 1: 'sentence' must be a non-empty string"),
    ({"images": ["a.jpg", "b.jpg"], "sentence": "x"}, r"entry 1: missing key 'label'"),
]


@pytest.mark.parametrize(("entry", "message"), BAD_NLVR2_ENTRIES)
def test_bad_nlvr2_entry_names_file_and_index(tmp_path, root, entry, message):
    file = write(tmp_path / "bad.json", [nlvr2_entry(), entry])
    with pytest.raises(DataError, match=r"bad\.json: " + message):
        read_nlvr2([file], root)
