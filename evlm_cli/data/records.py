"""The example records the readers yield, and the image-level split shared by the readers."""

from __future__ import annotations

from collections.abc import Collection
from typing import NotRequired, TypedDict, TypeVar

import numpy as np


class VqaRecord(TypedDict):
    """One VQA question: `answers` lists every annotator's answer (repeats allowed, empty if unlabelled)."""

    image: str
    question: str
    answers: list[str]
    question_id: int
    answer_type: NotRequired[str]  # yes/no, number, other (VQAv2), where the data gives it


class PairRecord(TypedDict):
    """One image-text pair for pre-training or retrieval training; an image may have several."""

    image: str
    caption: str


class RetrievalRecord(TypedDict):
    """One retrieval evaluation image and every caption that counts as its match."""

    image: str
    captions: list[str]


class Nlvr2Record(TypedDict):
    """One NLVR2 example: a sentence about two images (`images[0]` is the left one) and whether
    it is true of them."""

    images: list[str]
    sentence: str
    label: bool


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


def split_off_pairs_by_image(
    records: list[Nlvr2Record], fraction: float, seed: int
) -> tuple[list[Nlvr2Record], list[Nlvr2Record]]:
    """Move the records of a seeded `fraction` of the image groups into a second list.

    Images that share a record, directly or through other records, form a group, and a group
    moves whole: no image lands on both sides and no record is dropped. NLVR2 draws its pairs
    from sets of related images, so its groups are those sets. A group is held out when its
    first image (in sorted order) is among `held_out_images` of the groups' first images; data
    that links every image into one group cannot be split, and raises ValueError.
    Both lists keep the input order.
    """
    parent: dict[str, str] = {}

    def root(image: str) -> str:
        parent.setdefault(image, image)
        while parent[image] != image:
            parent[image] = parent[parent[image]]  # path halving keeps the chains short
            image = parent[image]
        return image

    for record in records:
        first, *others = record["images"]
        for other in others:
            # The smaller path is the root, so each group is named by its first image.
            low, high = sorted((root(first), root(other)))
            parent[high] = low
    groups = {root(image) for image in parent}
    if len(groups) < 2:
        raise ValueError(f"the records link their images into {len(groups)} group(s), which "
                         "cannot be split into two non-empty parts")
    held = held_out_images(groups, fraction, seed)
    kept = [record for record in records if root(record["images"][0]) not in held]
    carved = [record for record in records if root(record["images"][0]) in held]
    return kept, carved
