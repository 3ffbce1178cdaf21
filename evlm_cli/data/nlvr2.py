"""NLVR2-style data derived from easy-VQA: true-or-false statements about a pair of its images.

This is derived demo data, not NLVR2 itself. Each example shows two easy-VQA images (left is
`images[0]`, right is `images[1]`) and one statement about them, made from the facts
`captions.easy_vqa_facts` measures (shape, colour, size, position). The statements are

    the left image contains a {thing}          the right image contains a {thing}
    both images contain a {thing}              only one image contains a {thing}
    no image contains a {thing}
    the two shapes are the same {color|size|shape}
    the two shapes are not the same {color|size|shape}

where a {thing} is "{shape}", "{color} shape", "{size} shape", "{color} {shape}" or
"shape {place}" ("a shape in the top left"). Their words are the captions' (the tokenizer every
task uses is trained on the captions) except both, one, two, are, same and size; images and
shapes are split as image + s and shape + s.

Labels are balanced exactly: each split draws its labels as a shuffled half-true, half-false
list, and an example first draws its label, then its template and kind of thing, then a right
image and fill-ins for which the statement has that label. A right image that allows none is
drawn again, so each template and kind of thing is as often true as false: the words of a
statement, without the images, say next to nothing of its label.
"""

from __future__ import annotations

from itertools import product
from typing import NamedTuple

import numpy as np

from evlm_cli.data.captions import (
    COLORS,
    PLACE_PHRASES,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeFacts,
    easy_vqa_facts,
)
from evlm_cli.data.easy_vqa import read_easy_vqa
from evlm_cli.data.records import Nlvr2Record

SPLITS = ("train", "val", "test")
# Each image of a split is the left image of this many examples (and, drawn at random, the
# right one of about as many): 3600 train, 400 val and 1000 test images at val_fraction 0.1
# give 7200, 800 and 2000 examples, about as many as the VQA task's questions per image allow.
STATEMENTS_PER_IMAGE = 2
# Right images drawn for a template before drawing another one, which would make the template
# less often true than false. The hardest, a true "both images contain a red circle", needs the
# left image's colour and shape (1 in 24 images): 300 draws miss it about once in 300,000.
PARTNER_TRIES = 300

# Each kind of thing a statement names: the facts it names, and the words after "a".
THINGS = {
    "shape": (("shape",), "{shape}"),
    "color": (("color",), "{color} shape"),
    "size": (("size",), "{size} shape"),
    "color shape": (("color", "shape"), "{color} {shape}"),
    "place": (("position",), "shape {place}"),
}
FACT_VALUES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "position": tuple(position for row in POSITIONS for position in row),
}
THING_TEMPLATES = {
    "left": "the left image contains a {thing}",
    "right": "the right image contains a {thing}",
    "both": "both images contain a {thing}",
    "only one": "only one image contains a {thing}",
    "no image": "no image contains a {thing}",
}
# Comparisons name a fact, not a value: "the two shapes are the same color".
COMPARISON_TEMPLATES = {
    "same": "the two shapes are the same {fact}",
    "not same": "the two shapes are not the same {fact}",
}
COMPARED_FACTS = ("color", "size", "shape")
TEMPLATES = (*THING_TEMPLATES, *COMPARISON_TEMPLATES)


class Statement(NamedTuple):
    """A template filled in: `kind` is a THINGS key or, for a comparison, the fact compared;
    `value` holds the named facts' values (empty for a comparison)."""

    template: str
    kind: str
    value: tuple[str, ...] = ()


def statement_text(statement: Statement) -> str:
    if statement.template in COMPARISON_TEMPLATES:
        return COMPARISON_TEMPLATES[statement.template].format(fact=statement.kind)
    fields, phrase = THINGS[statement.kind]
    words = dict(zip(fields, statement.value, strict=True))
    if "position" in words:
        words["place"] = PLACE_PHRASES[words.pop("position")]
    thing = phrase.format(**words)
    return THING_TEMPLATES[statement.template].format(thing=thing)


def statement_truth(statement: Statement, left: ShapeFacts, right: ShapeFacts) -> bool:
    """Whether `statement` is true of a left image showing `left` and a right one showing `right`."""
    if statement.template in COMPARISON_TEMPLATES:
        agree = getattr(left, statement.kind) == getattr(right, statement.kind)
        return agree if statement.template == "same" else not agree
    fields = THINGS[statement.kind][0]
    left_has = tuple(getattr(left, field) for field in fields) == statement.value
    right_has = tuple(getattr(right, field) for field in fields) == statement.value
    return {
        "left": left_has,
        "right": right_has,
        "both": left_has and right_has,
        "only one": left_has != right_has,
        "no image": not left_has and not right_has,
    }[statement.template]


def kinds_of(template: str) -> tuple[str, ...]:
    return COMPARED_FACTS if template in COMPARISON_TEMPLATES else tuple(THINGS)


def fill_ins(template: str, kind: str) -> list[Statement]:
    """Every statement `template` makes about a `kind` of thing, in a fixed order."""
    if template in COMPARISON_TEMPLATES:
        return [Statement(template, kind)]
    values = product(*(FACT_VALUES[field] for field in THINGS[kind][0]))
    return [Statement(template, kind, value) for value in values]


def pair_statements(facts: dict[str, ShapeFacts], seed: int, stream: int,
                    per_image: int = STATEMENTS_PER_IMAGE) -> list[Nlvr2Record]:
    """Examples pairing the images of `facts` with each other (see the module docstring).

    Each image is the left image of `per_image` examples; the draws are seeded by (seed,
    stream), so each split gets its own. Raises ValueError for fewer than two images.
    """
    images = sorted(facts)  # the draws must not depend on the readers' order
    if len(images) < 2:
        raise ValueError(f"cannot pair {len(images)} image(s): statements need two")
    rng = np.random.default_rng([seed, stream])
    count = per_image * len(images)
    labels = rng.permutation(np.arange(count) % 2 == 0)
    lefts = np.concatenate([rng.permutation(len(images)) for _ in range(per_image)])
    every_fill_in = {(template, kind): fill_ins(template, kind)
                     for template in TEMPLATES for kind in kinds_of(template)}
    records = []
    for left, label in zip(lefts.tolist(), labels.tolist(), strict=True):
        right, statement = _draw_statement(images, facts, left, label, every_fill_in, rng)
        records.append(Nlvr2Record(images=[images[left], images[right]],
                                   sentence=statement_text(statement), label=label))
    return records


def read_easy_vqa_nlvr2(val_fraction: float, seed: int) -> dict[str, list[Nlvr2Record]]:
    """The NLVR2 task on easy-VQA: `train`, `val` and `test` examples (`pair_statements`).

    `train` and `val` split easy-VQA's train images as `read_easy_vqa` does for the same seed
    (as the VQA and retrieval tasks do); `test` is made from its test images. Both images of an
    example come from one split.
    """
    vqa = read_easy_vqa(val_fraction, seed)
    return {split: pair_statements(easy_vqa_facts(vqa[split]), seed, stream)
            for stream, split in enumerate(SPLITS)}


def _draw_statement(
    images: list[str], facts: dict[str, ShapeFacts], left: int, label: bool,
    every_fill_in: dict[tuple[str, str], list[Statement]], rng: np.random.Generator,
) -> tuple[int, Statement]:
    """A right image and a statement with `label` about it and image `left`.

    Ends: a left- or right-image statement has fill-ins of either label with any right image.
    """
    while True:
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        kinds = kinds_of(template)
        candidates = every_fill_in[template, kinds[rng.integers(len(kinds))]]
        for _ in range(PARTNER_TRIES):
            right = int(rng.integers(len(images) - 1))
            right += right >= left  # any image but the left one
            shown = facts[images[left]], facts[images[right]]
            fitting = [s for s in candidates if statement_truth(s, *shown) == label]
            if fitting:
                return right, fitting[rng.integers(len(fitting))]
