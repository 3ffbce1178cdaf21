import re
from collections import Counter

import easy_vqa
import numpy as np
import pytest
from PIL import Image, ImageDraw

from evlm_cli.core.errors import DataError
from evlm_cli.data.captions import (
    CAPTION_TEMPLATES,
    COLORS,
    PLACE_PHRASES,
    SHAPES,
    ShapeFacts,
    captions,
    easy_vqa_facts,
    image_facts,
    measure_shape,
    read_easy_vqa_pairs,
    read_easy_vqa_retrieval,
    stated_facts,
)
from evlm_cli.data.easy_vqa import read_easy_vqa
from evlm_cli.data.records import VqaRecord

SIDE = 64
BACKGROUND = (248, 234, 230)  # a tint like easy-VQA's
SCALE = 4  # draw large and shrink, so that edges are anti-aliased as easy-VQA's are
VAL_FRACTION, SEED = 0.1, 3


def draw(shape, color, box):
    """A 64x64 RGB uint8 image of one shape filling `box` (left, top, right, bottom), in pixels."""
    image = Image.new("RGB", (SIDE * SCALE, SIDE * SCALE), BACKGROUND)
    left, top, right, bottom = (value * SCALE for value in box)
    canvas = ImageDraw.Draw(image)
    fill = COLORS[color]
    if shape == "rectangle":
        canvas.rectangle([left, top, right - 1, bottom - 1], fill=fill)
    elif shape == "circle":
        canvas.ellipse([left, top, right - 1, bottom - 1], fill=fill)
    else:
        canvas.polygon([((left + right) / 2, top), (right - 1, bottom - 1), (left, bottom - 1)],
                       fill=fill)
    return np.asarray(image.resize((SIDE, SIDE), Image.Resampling.BOX))


@pytest.fixture(scope="module")
def vqa():
    return read_easy_vqa(VAL_FRACTION, SEED)


@pytest.fixture(scope="module")
def train_facts(vqa):
    return easy_vqa_facts(vqa["train"] + vqa["val"])


@pytest.fixture(scope="module")
def pairs():
    return read_easy_vqa_pairs(VAL_FRACTION, SEED)


@pytest.fixture(scope="module")
def retrieval():
    return read_easy_vqa_retrieval(VAL_FRACTION, SEED)


def images_of(records):
    return {record["image"] for record in records}


# Measuring pixels

def test_small_square_in_the_top_left():
    facts = measure_shape(draw("rectangle", "red", (2, 3, 12, 13)))
    assert facts == ShapeFacts("rectangle", "red", "small", "top left")


@pytest.mark.parametrize(("shape", "color", "box", "size", "position"), [
    ("circle", "blue", (14, 14, 50, 50), "large", "center"),
    ("triangle", "teal", (40, 40, 60, 60), "medium", "bottom right"),
    ("circle", "yellow", (4, 28, 12, 36), "small", "left"),  # 8 px: pixel rounding matters most
    ("triangle", "gray", (50, 2, 58, 10), "small", "top right"),
    ("rectangle", "black", (28, 30, 36, 62), "large", "bottom"),  # the longest side decides
    ("rectangle", "brown", (24, 1, 43, 20), "medium", "top"),
    ("circle", "green", (44, 20, 64, 40), "medium", "right"),  # touching the border
])
def test_measured_shape_colour_size_and_position(shape, color, box, size, position):
    assert measure_shape(draw(shape, color, box)) == ShapeFacts(shape, color, size, position)


@pytest.mark.parametrize("row", range(3))
@pytest.mark.parametrize("column", range(3))
def test_each_grid_cell_is_named(row, column):
    centre_x, centre_y = column * SIDE // 3 + 10, row * SIDE // 3 + 10
    pixels = draw("rectangle", "red", (centre_x - 4, centre_y - 4, centre_x + 4, centre_y + 4))
    expected = [["top left", "top", "top right"], ["left", "center", "right"],
                ["bottom left", "bottom", "bottom right"]][row][column]
    assert measure_shape(pixels).position == expected


def test_blank_image_has_no_shape():
    with pytest.raises(ValueError, match="no shape"):
        measure_shape(np.full((SIDE, SIDE, 3), 240, dtype=np.uint8))


def test_measured_shape_and_colour_agree_with_answers_on_real_images():
    texts, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()
    checked = Counter()
    for image_id in sorted(set(image_ids))[:30]:
        with Image.open(paths[image_id]) as image:
            facts = measure_shape(np.asarray(image.convert("RGB")))
        for answer, about in zip(answers, image_ids, strict=True):
            if about == image_id and answer in SHAPES:
                assert facts.shape == answer, image_id
                checked["shape"] += 1
            elif about == image_id and answer in COLORS:
                assert facts.color == answer, image_id
                checked["color"] += 1
    assert checked["shape"] >= 20 and checked["color"] >= 20


# Facts stated by the answers

@pytest.mark.parametrize(("questions", "expected"), [
    ([("what shape is in the image?", "circle"), ("what color is the shape?", "red")],
     ("circle", "red")),
    ([("what color is the triangle?", "blue")], ("triangle", "blue")),
    ([("what is the gray shape?", "rectangle")], ("rectangle", "gray")),
    ([("is there a teal shape?", "yes"), ("is no circle present?", "no")], ("circle", "teal")),
    ([("does the image not contain a brown shape?", "yes")], (None, None)),
    ([("is there not a circle?", "yes"), ("does the image contain a triangle?", "no")],
     ("rectangle", None)),  # the one shape not ruled out
])
def test_stated_facts(questions, expected):
    assert stated_facts(questions) == expected


def test_contradicting_answers_raise():
    with pytest.raises(ValueError, match=r"shape \(circle, triangle\)"):
        stated_facts([("what shape is present?", "circle"), ("what is the red shape?", "triangle")])
    with pytest.raises(ValueError, match="color"):
        stated_facts([("what color is the shape?", "red"), ("is there a red shape?", "no")])


def test_answers_that_disagree_with_the_pixels_name_the_image(tmp_path):
    path = tmp_path / "7.png"
    Image.fromarray(draw("rectangle", "red", (2, 2, 20, 20))).save(path)
    record = VqaRecord(image=str(path), question="what color is the shape?", answers=["blue"],
                       question_id=0)
    assert image_facts(draw("rectangle", "red", (2, 2, 20, 20)), [("what shape?", "rectangle")])
    with pytest.raises(DataError, match=r"easy-VQA image .*7\.png: .*color is blue.*red"):
        easy_vqa_facts([record])
    Image.fromarray(np.full((SIDE, SIDE, 3), 240, dtype=np.uint8)).save(path)
    with pytest.raises(DataError, match=r"7\.png: no shape"):
        easy_vqa_facts([record])


# Captions

def test_every_caption_holds_every_fact():
    facts = ShapeFacts("triangle", "yellow", "medium", "bottom left")
    texts = captions(facts)
    assert len(texts) == len(CAPTION_TEMPLATES) >= 4
    assert len(set(texts)) == len(texts)
    for text in texts:
        words = set(re.findall(r"[a-z]+", text))
        assert {"triangle", "yellow", "medium"} <= words
        assert PLACE_PHRASES["bottom left"] in text
    assert texts[0] == "a medium yellow triangle in the bottom left"


def test_captions_use_every_word_of_the_questions():
    """The tokenizer learnt on the captions reads the questions: none of their words, nor the
    question mark, may be missing from the captions."""
    import easy_vqa

    questions = easy_vqa.get_train_questions()[0]
    asked = {w for q in questions for w in re.findall(r"[a-z]+|\?", q.lower())}
    facts = ShapeFacts("circle", "red", "small", "center")
    said = {w for c in captions(facts) for w in re.findall(r"[a-z]+|\?", c)}
    said |= set(SHAPES) | set(COLORS)  # the slots take every shape and colour
    assert asked <= said, sorted(asked - said)


def test_negated_captions_name_only_the_shapes_not_shown():
    """Each shape has captions that rule the other two out; the negated clause names both of
    them and not the shape shown, which the rest of the caption names."""
    for shape in SHAPES:
        facts = ShapeFacts(shape, "red", "small", "center")
        negations = [text for text in captions(facts)
                     if " no " in f" {text} " or " not " in f" {text} "]
        assert negations, f"no caption of a {shape} rules out the other shapes"
        for text in negations:
            negated = text.split(":")[0].split(", only")[0].split(" in the image")[0]
            assert negated != text, f"no clause boundary found in {text!r}"
            assert shape not in negated, text
            assert all(other in negated for other in SHAPES if other != shape), text
            assert f"red {shape}" in text[len(negated):], text


def test_captions_tell_apart_every_fact():
    base = ShapeFacts("circle", "red", "small", "center")
    changed = [base._replace(shape="triangle"), base._replace(color="teal"),
               base._replace(size="large"), base._replace(position="top")]
    for other in changed:
        assert not set(captions(base)) & set(captions(other))


# easy-VQA pairs and retrieval

def test_every_train_image_gets_facts_and_sizes_are_balanced(train_facts):
    assert len(train_facts) == len(easy_vqa.get_train_image_paths()) == 4000
    shares = Counter(facts.size for facts in train_facts.values())
    for size in ("small", "medium", "large"):
        assert 0.20 <= shares[size] / len(train_facts) <= 0.45, shares


def test_pairs_come_from_train_images_and_hold_out_read_easy_vqas_val(pairs, vqa):
    assert images_of(pairs["train"]) == images_of(vqa["train"])
    assert images_of(pairs["val"]) == images_of(vqa["val"])
    assert not images_of(pairs["val"]) & images_of(pairs["train"])
    assert images_of(pairs["train"]) <= set(easy_vqa.get_train_image_paths().values())
    per_image = Counter(record["image"] for record in pairs["train"] + pairs["val"])
    assert set(per_image.values()) == {len(CAPTION_TEMPLATES)}


def test_val_changes_with_the_seed(pairs):
    other = read_easy_vqa(VAL_FRACTION, SEED + 1)
    assert images_of(other["val"]) != images_of(pairs["val"])


def test_retrieval_galleries_are_unique_and_from_their_splits(retrieval, pairs, vqa):
    assert retrieval["train"] == pairs["train"]
    test_images = set(easy_vqa.get_test_image_paths().values())
    assert images_of(retrieval["test"]) <= test_images
    assert images_of(retrieval["val"]) <= images_of(vqa["val"])
    for split in ("val", "test"):
        canonical = [record["captions"][0] for record in retrieval[split]]
        assert len(set(canonical)) == len(canonical)
        assert all(len(record["captions"]) == len(CAPTION_TEMPLATES)
                   for record in retrieval[split])
    assert len(retrieval["test"]) >= 300
