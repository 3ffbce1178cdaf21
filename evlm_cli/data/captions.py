"""Image-text data made from easy-VQA's own images: pre-training pairs and a retrieval task.

easy-VQA has questions, not captions. Each image shows one shape on a plain background, so four
facts describe it fully: the shape and its colour (which the answers state, and the pixels show)
and its size and position (measured on the pixels). Captions put all four into words.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from PIL import Image

from evlm_cli.core.errors import DataError
from evlm_cli.data.easy_vqa import read_easy_vqa
from evlm_cli.data.records import PairRecord, RetrievalRecord, VqaRecord

SHAPES = ("circle", "rectangle", "triangle")
# The CSS colours easy-VQA paints with: the inside of every shape is exactly one of them.
COLORS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
}
SIZES = ("small", "medium", "large")
# Size is the longest side of the shape's bounding box over the image side. easy-VQA's shapes
# span 7 to 33 px of 64; the cuts between 17 and 18 px and between 25 and 26 px split the train
# images into near thirds, as near as whole pixels allow (docs/easy_vqa_demo.md).
SMALL_BELOW = 0.27
LARGE_FROM = 0.40
# Position is the 3x3 cell (rows top/middle/bottom, columns left/center/right) holding the
# bounding box's centre; cells are named as a person would say them.
POSITIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
PLACE_PHRASES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
# Shape is told by fill: covered area over the bounding box's area. Over the train images
# triangles fill 0.53-0.63, circles 0.79-0.87 (pi/4 plus pixel rounding) and rectangles 1.00;
# the cuts sit in the gaps.
TRIANGLE_BELOW_FILL = 0.7
RECTANGLE_FROM_FILL = 0.93
# A pixel this far (in any channel, of 255) from the background may be the shape's own colour;
# closer ones are anti-aliased edges, which never hold the shape's exact colour.
INK_MIN_DIFFERENCE = 32

# One caption per template and image, each with every fact. The tokenizer trained on these
# captions also reads the questions, so between them the templates use every word easy-VQA's
# questions use (what, present, does, not, contain, no, ?): a word the captions lacked would
# reach the task spelled out in single letters. The negated templates name the two shapes the
# image does not show.
CAPTION_TEMPLATES = (
    "a {size} {color} {shape} {place}",
    "there is a {size} {color} {shape} {place} of the image",
    "the image contains a {size} {shape} {place}, and its color is {color}",
    "what is present in the image? a {size} {color} {shape} {place}",
    "the image does not contain a {absent_a} or a {absent_b}: the shape {place} is a {size} "
    "{color} {shape}",
    "there is no {absent_a} and no {absent_b} in the image, only a {size} {color} {shape} "
    "{place}",
)
_NEGATIONS = {"not", "no"}


class ShapeFacts(NamedTuple):
    """What one easy-VQA image shows; as a tuple it is the image's identity in retrieval."""

    shape: str
    color: str
    size: str
    position: str


def measure_shape(pixels: np.ndarray) -> ShapeFacts:
    """The facts of an RGB uint8 [H, W, 3] image of one shape on a uniform background.

    The background is the most common border colour and the shape's colour the most common
    clearly different one; each pixel's coverage is where it lies between the two, so
    anti-aliased edges count in part. Raises ValueError when no shape stands out.
    """
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {pixels.shape}")
    height, width = pixels.shape[:2]
    image = pixels.astype(np.float32)
    background = _border_color(pixels)
    stands_out = np.abs(image - background).max(axis=2) > INK_MIN_DIFFERENCE
    if not stands_out.any():
        raise ValueError("no shape: no pixel stands out from the background")
    ink = _most_common_color(pixels[stands_out])
    direction = ink - background
    coverage = np.clip((image - background) @ direction / (direction @ direction), 0.0, 1.0)
    rows = np.flatnonzero((coverage >= 0.5).any(axis=1))
    columns = np.flatnonzero((coverage >= 0.5).any(axis=0))
    top, bottom, left, right = rows[0], rows[-1] + 1, columns[0], columns[-1] + 1
    # Extents summed from each row's and column's peak coverage, not counted in whole pixels:
    # at 7 px a whole-pixel box would make a small circle look nearly as full as a square.
    fill = coverage.sum() / (coverage.max(axis=0).sum() * coverage.max(axis=1).sum())
    longest_side = max((bottom - top) / height, (right - left) / width)
    row = min(int(3 * (top + bottom) / 2 / height), 2)
    column = min(int(3 * (left + right) / 2 / width), 2)
    return ShapeFacts(
        shape=_shape_of(fill),
        color=_nearest_color(ink),
        size=_size_of(longest_side),
        position=POSITIONS[row][column],
    )


def stated_facts(questions: Iterable[tuple[str, str]]) -> tuple[str | None, str | None]:
    """The (shape, colour) that an image's (question, answer) pairs settle, None where they do not.

    A "what ..." answer states a fact, and so does a shape or colour its question presupposes
    ("what color is the circle?"). A yes/no question naming one shape or colour says whether it
    is there ("is there not a red shape?" answered "no" says red is); ruling out all but one
    value settles it too. Raises ValueError when the answers contradict each other.
    """
    values = {"shape": set(SHAPES), "color": set(COLORS)}
    said: dict[str, set[str]] = {"shape": set(), "color": set()}
    ruled_out: dict[str, set[str]] = {"shape": set(), "color": set()}
    for question, answer in questions:
        words = re.findall(r"[a-z]+", question.lower())
        named = [word for word in words if _kind(word)]
        if answer in ("yes", "no"):
            # Only a question naming one value says something about that value alone.
            if len(named) == 1:
                present = (answer == "yes") != bool(_NEGATIONS & set(words))
                (said if present else ruled_out)[_kind(named[0])].add(named[0])
        else:
            for word in [*named, answer]:
                if _kind(word):
                    said[_kind(word)].add(word)
    settled = {}
    for kind in values:
        if len(said[kind]) > 1 or said[kind] & ruled_out[kind]:
            contradicting = ", ".join(sorted(said[kind]))
            raise ValueError(f"the answers contradict each other on the {kind} ({contradicting})")
        left = said[kind] or values[kind] - ruled_out[kind]
        settled[kind] = next(iter(left)) if len(left) == 1 else None
    return settled["shape"], settled["color"]


def image_facts(pixels: np.ndarray, questions: Iterable[tuple[str, str]]) -> ShapeFacts:
    """The measured facts of an easy-VQA image, checked against what its answers state.

    The answers settle shape and colour for most images but not all; the pixels always show
    them, and a disagreement raises ValueError rather than mislabel the image.
    """
    return _checked(measure_shape(pixels), questions)


def _checked(measured: ShapeFacts, questions: Iterable[tuple[str, str]]) -> ShapeFacts:
    for kind, stated in zip(("shape", "color"), stated_facts(questions), strict=True):
        seen = getattr(measured, kind)
        if stated is not None and stated != seen:
            raise ValueError(f"the answers say the {kind} is {stated}, the pixels show {seen}")
    return measured


def captions(facts: ShapeFacts) -> list[str]:
    """One caption per template, in template order; the first is the canonical one."""
    absent_a, absent_b = (shape for shape in SHAPES if shape != facts.shape)
    words = {
        "shape": facts.shape,
        "color": facts.color,
        "size": facts.size,
        "place": PLACE_PHRASES[facts.position],
        "absent_a": absent_a,
        "absent_b": absent_b,
    }
    return [template.format(**words) for template in CAPTION_TEMPLATES]


def easy_vqa_facts(records: list[VqaRecord]) -> dict[str, ShapeFacts]:
    """The facts of every image `records` ask about, in order of each image's first question."""
    questions: dict[str, list[tuple[str, str]]] = {}
    for record in records:
        asked = questions.setdefault(record["image"], [])
        asked += [(record["question"], answer) for answer in record["answers"]]
    facts = {}
    for image, asked in questions.items():
        try:
            facts[image] = _checked(_measured_file(image, *_stamp(image)), asked)
        except ValueError as error:
            raise DataError(f"easy-VQA image {image}: {error}") from error
    return facts


def caption_pairs(facts: dict[str, ShapeFacts]) -> list[PairRecord]:
    """One pair per image and caption template, image by image."""
    return [
        PairRecord(image=image, caption=caption)
        for image, shown in facts.items()
        for caption in captions(shown)
    ]


def retrieval_gallery(facts: dict[str, ShapeFacts]) -> list[RetrievalRecord]:
    """One evaluation record per distinct facts tuple: the first image showing it.

    Two images with the same facts get the same captions, so neither could be retrieved ahead
    of the other; keeping one of each makes a perfect recall@1 possible.
    """
    first_image: dict[ShapeFacts, str] = {}
    for image, shown in facts.items():
        first_image.setdefault(shown, image)
    return [
        RetrievalRecord(image=image, captions=captions(shown))
        for shown, image in first_image.items()
    ]


def read_easy_vqa_pairs(val_fraction: float, seed: int) -> dict[str, list[PairRecord]]:
    """Pre-training pairs from easy-VQA's train images: `train`, and `val` carved by image.

    The carving is `read_easy_vqa`'s own, so a seed holds out the same images here as there.
    """
    vqa = read_easy_vqa(val_fraction, seed)
    return {split: caption_pairs(easy_vqa_facts(vqa[split])) for split in ("train", "val")}


def read_easy_vqa_retrieval(val_fraction: float, seed: int) -> dict[str, list]:
    """The retrieval task: `train` pairs, and `val` and `test` galleries (`retrieval_gallery`).

    `train` and `val` split easy-VQA's train images as `read_easy_vqa` does for the same seed;
    `test` is made from its test images.
    """
    vqa = read_easy_vqa(val_fraction, seed)
    return {
        "train": caption_pairs(easy_vqa_facts(vqa["train"])),
        "val": retrieval_gallery(easy_vqa_facts(vqa["val"])),
        "test": retrieval_gallery(easy_vqa_facts(vqa["test"])),
    }


def _kind(word: str) -> str | None:
    """Which fact `word` names: "shape", "color", or None for any other word."""
    if word in SHAPES:
        return "shape"
    return "color" if word in COLORS else None


def _shape_of(fill: float) -> str:
    if fill < TRIANGLE_BELOW_FILL:
        return "triangle"
    return "rectangle" if fill >= RECTANGLE_FROM_FILL else "circle"


def _size_of(longest_side: float) -> str:
    if longest_side < SMALL_BELOW:
        return "small"
    return "large" if longest_side >= LARGE_FROM else "medium"


def _nearest_color(rgb: np.ndarray) -> str:
    names = list(COLORS)
    palette = np.array([COLORS[name] for name in names], dtype=np.float32)
    return names[int(((palette - rgb) ** 2).sum(axis=1).argmin())]


def _border_color(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    return _most_common_color(border)


def _most_common_color(colors: np.ndarray) -> np.ndarray:
    """The most frequent row of uint8 [N, 3], as float32 [3]."""
    # Packed into one integer per colour: np.unique over rows is slower.
    packed = colors.reshape(-1, 3).astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)
    values, counts = np.unique(packed, return_counts=True)
    most = int(values[counts.argmax()])
    return np.array([most >> 16, (most >> 8) & 255, most & 255], dtype=np.float32)


@functools.cache
def _measured_file(path: str, mtime_ns: int, size: int) -> ShapeFacts:
    """The measured facts of an image file, once per process and version of the file: the
    pairs, the retrieval galleries and the NLVR2 statements all measure the same 5,000."""
    return measure_shape(_decode(path))


def _stamp(path: str) -> tuple[int, int]:
    """What identifies a version of a file for `_measured_file`'s cache ((0, 0) if missing:
    decoding then names it)."""
    try:
        info = os.stat(path)
    except OSError:
        return 0, 0
    return info.st_mtime_ns, info.st_size


def _decode(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise DataError(f"easy-VQA image {path}: cannot be decoded ({error})") from error
