"""NLVR2-style statements derived from easy-VQA: texts, truth, balanced labels, splits, seeds."""

import re
from collections import Counter
from itertools import product

import easy_vqa
import numpy as np
import pytest

from evlm_cli.data import nlvr2
from evlm_cli.data.captions import (
    COLORS,
    PLACE_PHRASES,
    SHAPES,
    SIZES,
    ShapeFacts,
    captions,
    easy_vqa_facts,
)
from evlm_cli.data.easy_vqa import read_easy_vqa
from evlm_cli.data.nlvr2 import (
    STATEMENTS_PER_IMAGE,
    Statement,
    fill_ins,
    kinds_of,
    pair_statements,
    read_easy_vqa_nlvr2,
    statement_text,
    statement_truth,
)

VAL_FRACTION, SEED = 0.1, 3
POSITIONS = tuple(PLACE_PHRASES)
# The words statements use that no caption does (images and shapes are image/shape + s).
NEW_WORDS = {"both", "images", "one", "two", "shapes", "are", "same", "size"}

RED_CIRCLE = ShapeFacts("circle", "red", "small", "top left")
RED_TRIANGLE = ShapeFacts("triangle", "red", "large", "center")


# An independent reading of the statements, from their words alone -----------------------------

def named_facts(thing: str) -> dict[str, str]:
    """The facts a "{thing}" phrase (after "a") names, as ShapeFacts fields."""
    for position, place in PLACE_PHRASES.items():
        if thing == f"shape {place}":
            return {"position": position}
    named = {}
    for word in thing.split():
        field = {**dict.fromkeys(SHAPES, "shape"), **dict.fromkeys(COLORS, "color"),
                 **dict.fromkeys(SIZES, "size")}.get(word)
        assert field or word == "shape", f"unexpected word {word!r} in {thing!r}"
        if field:
            named[field] = word
    assert named, thing
    return named


def truth_of(sentence: str, left: ShapeFacts, right: ShapeFacts) -> bool:
    compared = re.fullmatch(r"the two shapes are (not )?the same (color|size|shape)", sentence)
    if compared:
        agree = getattr(left, compared[2]) == getattr(right, compared[2])
        return agree != bool(compared[1])
    about = re.fullmatch(r"(the left image contains|the right image contains|both images contain"
                         r"|only one image contains|no image contains) a (.+)", sentence)
    assert about, f"unparsed statement {sentence!r}"
    named = named_facts(about[2])
    left_shows = all(getattr(left, field) == value for field, value in named.items())
    right_shows = all(getattr(right, field) == value for field, value in named.items())
    return {
        "the left image contains": left_shows,
        "the right image contains": right_shows,
        "both images contain": left_shows and right_shows,
        "only one image contains": left_shows + right_shows == 1,
        "no image contains": not (left_shows or right_shows),
    }[about[1]]


# Templates --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("statement", "text", "truth"), [
    (Statement("left", "shape", ("circle",)), "the left image contains a circle", True),
    (Statement("left", "color shape", ("red", "triangle")), "the left image contains a red triangle",
     False),
    (Statement("left", "place", ("top left",)), "the left image contains a shape in the top left",
     True),
    (Statement("right", "shape", ("circle",)), "the right image contains a circle", False),
    (Statement("right", "size", ("large",)), "the right image contains a large shape", True),
    (Statement("right", "place", ("center",)), "the right image contains a shape in the center",
     True),
    (Statement("both", "color", ("red",)), "both images contain a red shape", True),
    (Statement("both", "size", ("small",)), "both images contain a small shape", False),
    (Statement("only one", "shape", ("triangle",)), "only one image contains a triangle", True),
    (Statement("only one", "color", ("red",)), "only one image contains a red shape", False),
    (Statement("only one", "color", ("blue",)), "only one image contains a blue shape", False),
    (Statement("no image", "color", ("blue",)), "no image contains a blue shape", True),
    (Statement("no image", "color shape", ("red", "circle")), "no image contains a red circle",
     False),
    (Statement("no image", "place", ("bottom",)), "no image contains a shape at the bottom", True),
    (Statement("same", "color"), "the two shapes are the same color", True),
    (Statement("same", "size"), "the two shapes are the same size", False),
    (Statement("same", "shape"), "the two shapes are the same shape", False),
    (Statement("not same", "color"), "the two shapes are not the same color", False),
    (Statement("not same", "size"), "the two shapes are not the same size", True),
    (Statement("not same", "shape"), "the two shapes are not the same shape", True),
])
def test_each_template_reads_and_judges_a_red_circle_beside_a_red_triangle(statement, text, truth):
    assert statement_text(statement) == text
    assert statement_truth(statement, RED_CIRCLE, RED_TRIANGLE) is truth
    assert truth_of(text, RED_CIRCLE, RED_TRIANGLE) is truth


def test_left_and_right_are_the_order_of_the_images():
    left = Statement("left", "shape", ("circle",))
    right = Statement("right", "shape", ("circle",))
    assert statement_truth(left, RED_CIRCLE, RED_TRIANGLE)
    assert not statement_truth(left, RED_TRIANGLE, RED_CIRCLE)
    assert not statement_truth(right, RED_CIRCLE, RED_TRIANGLE)
    assert statement_truth(right, RED_TRIANGLE, RED_CIRCLE)


def test_every_fill_in_is_judged_as_its_words_say():
    everything = [ShapeFacts(*facts) for facts in product(SHAPES, COLORS, SIZES, POSITIONS)]
    pairs = [(everything[i], everything[j]) for i, j in
             np.random.default_rng(0).integers(len(everything), size=(40, 2))]
    pairs.append((RED_CIRCLE, RED_CIRCLE))  # one pair that agrees on everything
    for template in nlvr2.TEMPLATES:
        for kind in kinds_of(template):
            for statement in fill_ins(template, kind):
                text = statement_text(statement)
                for left, right in pairs:
                    assert statement_truth(statement, left, right) == truth_of(text, left, right), (
                        text, left, right)


def test_statements_use_the_captions_words_but_a_few():
    everything = product(SHAPES, COLORS, SIZES, POSITIONS)
    caption_words = {word for facts in everything for caption in captions(ShapeFacts(*facts))
                     for word in re.findall(r"[a-z]+", caption)}
    statement_words = {word for template in nlvr2.TEMPLATES for kind in kinds_of(template)
                       for statement in fill_ins(template, kind)
                       for word in statement_text(statement).split()}
    assert statement_words - caption_words == NEW_WORDS


# Pairing hand-made facts -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def made_up_facts():
    """300 images with facts drawn at random: a split of a size the pairing meets in practice."""
    rng = np.random.default_rng(7)
    return {f"image{index:03d}.png": ShapeFacts(*(str(rng.choice(values)) for values in
                                                  (SHAPES, list(COLORS), SIZES, POSITIONS)))
            for index in range(300)}


def test_statements_are_true_exactly_when_labelled_so(made_up_facts):
    records = pair_statements(made_up_facts, seed=0, stream=0)
    for record in records:
        left, right = (made_up_facts[image] for image in record["images"])
        assert truth_of(record["sentence"], left, right) is record["label"], record


def test_labels_are_balanced_overall_and_per_template(made_up_facts):
    records = pair_statements(made_up_facts, seed=0, stream=0)
    assert len(records) == STATEMENTS_PER_IMAGE * len(made_up_facts)
    assert sum(record["label"] for record in records) == len(records) // 2
    by_template = Counter()
    true_by_template = Counter()
    for record in records:
        # "both images contain a red circle" -> "both images contain";
        # "the two shapes are the same color" -> "the two shapes are the same"
        template = re.sub(r" a .*| \w+$", "", record["sentence"])
        by_template[template] += 1
        true_by_template[template] += record["label"]
    # every template, "the two shapes are the same" too, about as often true as false
    assert len(by_template) == len(nlvr2.TEMPLATES)
    for template, count in by_template.items():
        assert 0.35 < true_by_template[template] / count < 0.65, (template, count)


def test_each_image_is_the_left_one_of_its_share_and_never_its_own_partner(made_up_facts):
    records = pair_statements(made_up_facts, seed=0, stream=0)
    lefts = Counter(record["images"][0] for record in records)
    assert lefts == dict.fromkeys(made_up_facts, STATEMENTS_PER_IMAGE)
    assert all(record["images"][0] != record["images"][1] for record in records)
    assert {record["images"][1] for record in records} <= set(made_up_facts)


def test_pairing_is_seeded_and_ignores_the_order_of_the_facts(made_up_facts):
    records = pair_statements(made_up_facts, seed=0, stream=0)
    reordered = dict(reversed(made_up_facts.items()))
    assert pair_statements(reordered, seed=0, stream=0) == records
    assert pair_statements(made_up_facts, seed=1, stream=0) != records
    assert pair_statements(made_up_facts, seed=0, stream=1) != records


def test_two_images_are_enough_and_one_is_not():
    records = pair_statements({"a": RED_CIRCLE, "b": RED_TRIANGLE}, seed=0, stream=0, per_image=4)
    assert len(records) == 8 and sum(record["label"] for record in records) == 4
    with pytest.raises(ValueError, match="cannot pair 1 image"):
        pair_statements({"a": RED_CIRCLE}, seed=0, stream=0)


# The derived task, read once ------------------------------------------------------------------

@pytest.fixture(scope="module")
def derived():
    """The reader's splits, and the facts it measured (recorded as it reads them)."""
    measured = {}

    def recording(records):
        facts = easy_vqa_facts(records)
        measured.update(facts)
        return facts

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nlvr2, "easy_vqa_facts", recording)
        splits = read_easy_vqa_nlvr2(VAL_FRACTION, SEED)
    return splits, measured


def images_of(records):
    return {image for record in records for image in record["images"]}


def test_splits_pair_their_own_images_as_the_vqa_task_splits_them(derived):
    splits, _ = derived
    vqa = read_easy_vqa(VAL_FRACTION, SEED)
    for split in ("train", "val", "test"):
        assert images_of(splits[split]) == {record["image"] for record in vqa[split]}
        lefts = Counter(record["images"][0] for record in splits[split])
        assert set(lefts.values()) == {STATEMENTS_PER_IMAGE}
    assert not images_of(splits["train"]) & images_of(splits["val"])
    assert not images_of(splits["test"]) & (images_of(splits["train"]) | images_of(splits["val"]))
    assert images_of(splits["test"]) <= set(easy_vqa.get_test_image_paths().values())
    assert [len(splits[split]) for split in ("train", "val", "test")] == [7200, 800, 2000]


def test_derived_labels_are_balanced_and_true_of_the_images(derived):
    splits, measured = derived
    for split, records in splits.items():
        assert abs(sum(record["label"] for record in records) / len(records) - 0.5) <= 0.05, split
        for record in records:
            left, right = (measured[image] for image in record["images"])
            assert truth_of(record["sentence"], left, right) is record["label"], record
