"""The example records the readers yield, and the image-level split shared by the readers."""

from __future__ import annotations

from collections.abc import Collection
from typing import TypedDict, TypeVar

import numpy as np


class VqaRecord(TypedDict):
    """One VQA question: `answers` lists every annotator's answer (repeats allowed, empty if unlabelled)."""

    image: str
    question: str
    answers: list[str]
    question_id: int


class PairRecord(TypedDict):
    """One image-text pair for pre-training or retrieval training; an image may have several."""

    image: str
    caption: str


class RetrievalRecord(TypedDict):
    """One retrieval evaluation image and every caption that counts as its match."""

    image: str
    captions: list[str]


Record = TypeVar("Record", VqaRecord, PairRecord, RetrievalRecord)


def held_out_images(images: Collection[str], fraction: float, seed: int) -> set[str]:
    """The seeded `fraction` of `images` that `split_off_by_image` moves out.

    The draw depends only on the set of images and the seed, so readers of different records
    about the same images (questions, captions) hold out the same ones. At least one image is
    held out, and at least one kept.
    """
    ordered = sorted(set(images))
    if len(ordered) < 2:
        raise ValueError(f"cannot split {len(ordered)} image(s) into two non-empty parts")
    held_count = min(max(1, round(fraction * len(ordered))), len(ordered) - 1)
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[index] for index in order[:held_count]}


def split_off_by_image(
    records: list[Record], fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Move the records of a seeded `fraction` of the images (`held_out_images`) into a second list.

    Splitting by image, not by record, keeps every held-out image unseen in training: easy-VQA
    asks several questions about each image, and a question split would leak the pictures.
    Both lists keep the input order.
    """
    held = held_out_images([record["image"] for record in records], fraction, seed)
    kept = [record for record in records if record["image"] not in held]
    carved = [record for record in records if record["image"] in held]
    return kept, carved
