"""The example record every reader yields, and the image-level split shared by the readers."""

from __future__ import annotations

from typing import TypedDict

import numpy as np


class VqaRecord(TypedDict):
    """One VQA question: `answers` lists every annotator's answer (repeats allowed, empty if unlabelled)."""

    image: str
    question: str
    answers: list[str]
    question_id: int


def split_off_by_image(
    records: list[VqaRecord], fraction: float, seed: int
) -> tuple[list[VqaRecord], list[VqaRecord]]:
    """Move the questions of a seeded `fraction` of the images into a second list.

    Splitting by image, not by question, keeps every held-out image unseen in training: easy-VQA
    asks several questions about each image, and a question split would leak the pictures.
    Both lists keep the input order. At least one image is held out, and at least one kept.
    """
    images = sorted({record["image"] for record in records})
    if len(images) < 2:
        raise ValueError(f"cannot split {len(images)} image(s) into two non-empty parts")
    held_count = min(max(1, round(fraction * len(images))), len(images) - 1)
    order = np.random.default_rng(seed).permutation(len(images))
    held = {images[index] for index in order[:held_count]}
    kept = [record for record in records if record["image"] not in held]
    carved = [record for record in records if record["image"] in held]
    return kept, carved
