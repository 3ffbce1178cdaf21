"""Read the easy-VQA dataset shipped by the `easy-vqa` package into VQA records."""

from __future__ import annotations

import easy_vqa

from evlm_cli.data.records import VqaRecord, split_off_by_image

# VQAv2's answer types; easy-VQA's answers are yes/no or a shape or colour name.
YES_NO, OTHER = "yes/no", "other"


def easy_vqa_answers() -> list[str]:
    """The 13 easy-VQA answers, in the package's order (which fixes the answer indices)."""
    return list(easy_vqa.get_answers())


def read_easy_vqa(val_fraction: float, seed: int) -> dict[str, list[VqaRecord]]:
    """Return the `train`, `val` and `test` records of easy-VQA.

    easy-VQA ships only train and test, so `val` is carved from train by image (see
    `split_off_by_image`) with `seed`: no val image appears in train. A question's id is its
    index in its easy-VQA file, so ids are unique within train+val and within test.
    """
    full_train = _read_split(easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths())
    train, val = split_off_by_image(full_train, val_fraction, seed)
    test = _read_split(easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths())
    return {"train": train, "val": val, "test": test}


def _read_split(questions: tuple[list, list, list], image_paths: dict[int, str]) -> list[VqaRecord]:
    texts, answers, image_ids = questions
    return [
        VqaRecord(image=image_paths[image_id], question=text, answers=[answer], question_id=index,
                  answer_type=YES_NO if answer in ("yes", "no") else OTHER)
        for index, (text, answer, image_id) in enumerate(zip(texts, answers, image_ids, strict=True))
    ]
