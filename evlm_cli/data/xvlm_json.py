"""Read the X-VLM / EfficientVLM JSON annotation formats (one reader per task) into records.

VQA files hold a list of entries
`{"image": <path relative to image_root>, "question": str, "answer": [str, ...], "question_id": int}`;
`answer` repeats VQAv2-style (one entry per annotator) and is absent in test files.
NLVR2, retrieval and captioning readers belong next to `read_vqa` and in `READERS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evlm_cli.data.records import VqaRecord
from evlm_cli.errors import DataError

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
    root = Path(image_root)
    if not root.is_dir():
        raise DataError(f"image_root {root}: no such directory")
    records: list[VqaRecord] = []
    found_images: set[Path] = set()  # many questions share an image: check each file once
    for file in files:
        entries = _load_json(Path(file))
        if not isinstance(entries, list):
            raise DataError(f"{file}: expected a JSON list of entries, got {type(entries).__name__}")
        for index, entry in enumerate(entries):
            where = f"{file}: entry {index}"
            records.append(_vqa_record(entry, root, require_answers, found_images, where))
    return records


# One reader per task; nlvr2, retrieval and captioning slot in here when implemented.
READERS: dict[str, Callable[..., list[Any]]] = {"vqa": read_vqa}


def _vqa_record(
    entry: Any, root: Path, require_answers: bool, found_images: set[Path], where: str
) -> VqaRecord:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("image", "question", "question_id"):
        if key not in entry:
            raise DataError(f"{where}: missing key {key!r}")
    image, question = entry["image"], entry["question"]
    if not isinstance(image, str) or not isinstance(question, str):
        raise DataError(f"{where}: 'image' and 'question' must be strings")
    answers = _answers(entry.get("answer"), require_answers, where)
    # Normalised, so that "a.png" and "./a.png" are stored as one image.
    image_path = Path(os.path.normpath(root / image))
    if image_path not in found_images:
        if not image_path.is_file():
            raise DataError(f"{where}: image {image_path} not found")
        found_images.add(image_path)
    return VqaRecord(
        image=str(image_path),
        question=question,
        answers=answers,
        question_id=_question_id(entry["question_id"], where),
    )


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
