"""Read the X-VLM / EfficientVLM JSON annotation formats (one reader per task) into records.

VQA files hold a list of entries
`{"image": <path relative to image_root>, "question": str, "answer": [str, ...], "question_id": int}`;
`answer` repeats VQAv2-style (one entry per annotator) and is absent in test files; an optional
`answer_type` (yes/no, number, other) splits the VQA accuracy by type.
Retrieval and pre-training files hold `{"image": ..., "caption": ...}` entries (X-VLM's and
ALBEF's): a train entry's caption is one string or, in some pre-training files, a list of
them; an evaluation entry lists every caption that matches its image. Captioning needs no
reader of its own: X-VLM's COCO Karpathy files are the same two shapes, `{"image": ...,
"caption": str}` per train pair and `{"image": ..., "caption": [str, ...]}` per val/test image,
so `read_pairs` and `read_retrieval_eval` read them. NLVR2 files hold `{"images": [left,
right], "sentence": str, "label": "True" | "False"}`. Other keys (`image_id`, for one) are
ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from evlm_cli.core.errors import DataError
from evlm_cli.data.records import Nlvr2Record, PairRecord, RetrievalRecord, VqaRecord

PathLike = str | os.PathLike


def read_answer_list(path: PathLike) -> list[str]:
    """Read a JSON list of distinct answer strings; its order fixes the answer indices."""
    answers = _load_json(Path(path))
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise DataError(f"answer list {path}: expected a JSON list of strings")
    if not answers:
        raise DataError(f"answer list {path}: is empty")
    if len(set(answers)) != len(answers):
        duplicate = next(a for index, a in enumerate(answers) if a in answers[:index])
        raise DataError(f"answer list {path}: answer {duplicate!r} appears twice")
    return answers


def read_vqa(
    files: Sequence[PathLike], image_root: PathLike, require_answers: bool
) -> list[VqaRecord]:
    """Read VQA entries from `files` in order; image paths come back joined to `image_root`.

    `require_answers` makes a missing or empty `answer` an error (train and val); test files
    may omit it, and their records get `answers == []`.
    """
    images = _ImageChecker(image_root)
    records: list[VqaRecord] = []
    for entry, where in _entries(files, ("image", "question", "question_id")):
        image, question = entry["image"], entry["question"]
        if not isinstance(image, str) or not isinstance(question, str):
            raise DataError(f"{where}: 'image' and 'question' must be strings")
        answers = _answers(entry.get("answer"), require_answers, where)
        record = VqaRecord(image=images.path(image), question=question, answers=answers,
                           question_id=_question_id(entry["question_id"], where))
        if "answer_type" in entry:  # VQAv2's annotations give it; X-VLM's files do not
            if not isinstance(entry["answer_type"], str):
                raise DataError(f"{where}: 'answer_type' must be a string")
            record["answer_type"] = entry["answer_type"]
        records.append(record)
    return records


def read_pairs(files: Sequence[PathLike], image_root: PathLike) -> list[PairRecord]:
    """Read image-caption pairs (retrieval train, pre-training) from `files` in order.

    An entry whose `caption` is a list yields one pair per caption, in its order.
    """
    images = _ImageChecker(image_root)
    records: list[PairRecord] = []
    for entry, where in _entries(files, ("image", "caption")):
        image = images.path(_image(entry, where))
        records += [PairRecord(image=image, caption=caption)
                    for caption in _captions(entry["caption"], where)]
    return records


def read_retrieval_eval(files: Sequence[PathLike], image_root: PathLike) -> list[RetrievalRecord]:
    """Read retrieval val/test entries: one record per image with all of its captions.

    A `caption` given as one string counts as a list of one.
    """
    images = _ImageChecker(image_root)
    records: list[RetrievalRecord] = []
    for entry, where in _entries(files, ("image", "caption")):
        image = images.path(_image(entry, where))
        records.append(RetrievalRecord(image=image, captions=_captions(entry["caption"], where)))
    return records


def read_nlvr2(files: Sequence[PathLike], image_root: PathLike) -> list[Nlvr2Record]:
    """Read NLVR2 entries from `files` in order: two images (left, right), a sentence, its truth."""
    images = _ImageChecker(image_root)
    records: list[Nlvr2Record] = []
    for entry, where in _entries(files, ("images", "sentence", "label")):
        pair, sentence = entry["images"], entry["sentence"]
        if not isinstance(pair, list) or not all(isinstance(image, str) for image in pair):
            raise DataError(f"{where}: 'images' must be a list of two image paths")
        if len(pair) != 2:
            raise DataError(f"{where}: 'images' must list two images (left, right), got {len(pair)}")
        if not isinstance(sentence, str) or not sentence.strip():
            raise DataError(f"{where}: 'sentence' must be a non-empty string")
        records.append(Nlvr2Record(
            images=[images.path(image) for image in pair],
            sentence=sentence,
            label=_label(entry["label"], where),
        ))
    return records


class _ImageChecker:
    """Joins image paths to the image root, which must exist. Whether each file exists and
    decodes is prepare's scan (`evlm_cli.data.images.scan_images`), which finds every bad
    image at once, and may skip them."""

    def __init__(self, image_root: PathLike) -> None:
        self.root = Path(image_root)
        if not self.root.is_dir():
            raise DataError(f"image_root {self.root}: no such directory")

    def path(self, image: str) -> str:
        # Normalised, so that "a.png" and "./a.png" are stored as one image.
        return str(Path(os.path.normpath(self.root / image)))


def _entries(files: Sequence[PathLike], keys: tuple[str, ...]) -> Iterator[tuple[dict, str]]:
    """Each entry of each file with its location ("<file>: entry <index>"), having `keys`."""
    for file in files:
        entries = _load_json(Path(file))
        if not isinstance(entries, list):
            raise DataError(f"{file}: expected a JSON list of entries, got {type(entries).__name__}")
        if not entries:
            raise DataError(f"{file}: holds no entries")
        for index, entry in enumerate(entries):
            where = f"{file}: entry {index}"
            if not isinstance(entry, dict):
                raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
            for key in keys:
                if key not in entry:
                    raise DataError(f"{where}: missing key {key!r}")
            yield entry, where


def _image(entry: dict, where: str) -> str:
    if not isinstance(entry["image"], str):
        raise DataError(f"{where}: 'image' must be a string")
    return entry["image"]


def _captions(value: Any, where: str) -> list[str]:
    captions = [value] if isinstance(value, str) else value
    if not isinstance(captions, list) or not all(isinstance(caption, str) for caption in captions):
        raise DataError(f"{where}: 'caption' must be a string or a list of strings")
    if not captions:
        raise DataError(f"{where}: 'caption' is an empty list")
    if any(not caption.strip() for caption in captions):
        raise DataError(f"{where}: 'caption' holds an empty caption")
    return captions


def _answers(value: Any, required: bool, where: str) -> list[str]:
    if value is None:
        if required:
            raise DataError(f"{where}: missing key 'answer' (required outside test files)")
        return []
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not all(isinstance(answer, str) for answer in answers):
        raise DataError(f"{where}: 'answer' must be a string or a list of strings")
    if required and not answers:
        raise DataError(f"{where}: 'answer' is empty")
    return answers


def _label(value: Any, where: str) -> bool:
    # X-VLM writes NLVR2's labels as the strings "True" and "False"; other exports write JSON
    # booleans or 0/1.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise DataError(f"{where}: 'label' must be \"True\" or \"False\" (or true/false, or 1/0), "
                    f"got {value!r}")


def _question_id(value: Any, where: str) -> int:
    # VQAv2 ids are ints; some exports write them as digit strings.
    if isinstance(value, bool):
        raise DataError(f"{where}: 'question_id' must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise DataError(f"{where}: 'question_id' must be an integer, got {value!r}")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error})") from error
