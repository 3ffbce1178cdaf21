"""The prepare stage's library: read a task dataset once and write tensors later stages load fast.

Layout of the output directory:
- `images.safetensors`: `images` uint8 [N_images, 3, S, S], each source image once across splits;
- `<split>.safetensors` per split: `image_index` int64 [N], `input_ids` int32 [N, L],
  `attention_mask` uint8 [N, L], `targets` float16 [N, A] (soft scores, see
  `evlm_cli.tasks.vqa.answer_scores`), `question_id` int64 [N];
- `answers.json` (index order), `tokenizer/` (HF format), `meta.json`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import BertTokenizerFast

from evlm_cli.config import DataConfig
from evlm_cli.data.easy_vqa import easy_vqa_answers, read_easy_vqa
from evlm_cli.data.records import VqaRecord, split_off_by_image
from evlm_cli.data.sources import source_problems
from evlm_cli.data.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece
from evlm_cli.data.xvlm_json import read_answer_list, read_vqa
from evlm_cli.errors import DataError
from evlm_cli.io import atomic_path, atomic_save_safetensors, atomic_write_json
from evlm_cli.tasks.vqa import answer_scores

SPLITS = ("train", "val", "test")
# Pixels are stored raw; loaders map them to [-1, 1] with this per-channel mean and std.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)


def prepare(data: DataConfig, task: str, seed: int, out_dir: Path) -> dict:
    """Read the dataset `data` names and write the prepared files into `out_dir`.

    Returns a summary: examples per split, number of images, answers and vocabulary size.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_splits, answers = read_vqa_splits(data, task, seed)
    tokenizer = _prepare_tokenizer(data, full_splits["train"], out / "tokenizer")
    splits = {
        name: limit_examples(records, data.limit, seed, SPLITS.index(name))
        for name, records in full_splits.items()
    }
    image_paths = unique_images(splits)
    image_row = {path: row for row, path in enumerate(image_paths)}
    atomic_save_safetensors(
        out / "images.safetensors", {"images": decode_images(image_paths, data.image_size)}
    )
    answer_index = {answer: index for index, answer in enumerate(answers)}
    split_meta = {}
    for name, records in splits.items():
        tensors = encode_split(records, image_row, answer_index, tokenizer, data.max_text_len)
        atomic_save_safetensors(out / f"{name}.safetensors", tensors)
        split_meta[name] = {
            "examples": len(records),
            "images": len({record["image"] for record in records}),
            "labelled": all(record["answers"] for record in records),
        }
    atomic_write_json(out / "answers.json", answers)
    meta = {
        "source": data.source,
        "task": task,
        "splits": split_meta,
        "num_images": len(image_paths),
        "num_answers": len(answers),
        "image_size": data.image_size,
        "max_text_len": data.max_text_len,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
    }
    atomic_write_json(out / "meta.json", meta)
    return {
        "splits": {name: info["examples"] for name, info in split_meta.items()},
        "num_images": len(image_paths),
        "num_answers": len(answers),
        "vocab_size": len(tokenizer),
    }


def read_vqa_splits(data: DataConfig, task: str, seed: int
                    ) -> tuple[dict[str, list[VqaRecord]], list[str]]:
    """Records per split (train, val and, when present, test) and the answer list.

    easy-VQA carves val from train by image. So does xvlm-json when no val file is given.
    """
    problems = source_problems(data.source, task, data.train, data.test, data.image_root,
                               data.answer_list)
    if problems:
        field, message = problems[0]
        raise DataError(f"data {field}: {message}")
    if task != "vqa":
        raise DataError(f"prepare reads only VQA data so far, not task {task!r}")
    if data.source == "easy-vqa":
        return read_easy_vqa(data.val_fraction, seed), easy_vqa_answers()
    splits = {"train": read_vqa(list(data.train), data.image_root, require_answers=True)}
    if data.val:
        splits["val"] = read_vqa(list(data.val), data.image_root, require_answers=True)
    else:
        splits["train"], splits["val"] = _carve_val(splits["train"], data.val_fraction, seed)
    if data.test:
        splits["test"] = read_vqa(list(data.test), data.image_root, require_answers=False)
    return splits, read_answer_list(data.answer_list)


def limit_examples(records: list, limit: int | None, seed: int, stream: int) -> list:
    """The first `limit` records of a seeded shuffle, back in source order; all when no limit."""
    if limit is None or len(records) <= limit:
        return records
    chosen = np.random.default_rng([seed, stream]).permutation(len(records))[:limit]
    return [records[index] for index in sorted(chosen.tolist())]


def unique_images(splits: dict[str, list[VqaRecord]]) -> list[str]:
    """Every image path once, in order of first use over the splits."""
    return list(dict.fromkeys(record["image"] for records in splits.values() for record in records))


def decode_images(paths: list[str], size: int) -> torch.Tensor:
    """Decode images to uint8 [N, 3, size, size] RGB, resizing (bicubic) those of another size."""
    images = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    for row, path in enumerate(tqdm(paths, desc="decode images", unit="img")):
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError) as error:
            raise DataError(f"image {path}: cannot be decoded ({error})") from error
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
        images[row] = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)
    return images


def encode_split(
    records: list[VqaRecord],
    image_row: dict[str, int],
    answer_index: dict[str, int],
    tokenizer: BertTokenizerFast,
    max_text_len: int,
) -> dict[str, torch.Tensor]:
    """Tensors of one split: image rows, padded token ids and mask, soft targets, question ids."""
    count = len(records)
    encoded = tokenizer(
        [record["question"] for record in records],
        padding="max_length",
        truncation=True,
        max_length=max_text_len,
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    input_ids = torch.tensor(encoded["input_ids"], dtype=torch.int32).reshape(count, max_text_len)
    mask = torch.tensor(encoded["attention_mask"], dtype=torch.uint8).reshape(count, max_text_len)
    return {
        "image_index": torch.tensor([image_row[r["image"]] for r in records], dtype=torch.int64),
        "input_ids": input_ids,
        "attention_mask": mask,
        "targets": target_scores(records, answer_index),
        "question_id": torch.tensor([r["question_id"] for r in records], dtype=torch.int64),
    }


def target_scores(records: list[VqaRecord], answer_index: dict[str, int]) -> torch.Tensor:
    """float16 [N, A] soft scores; annotations outside the answer list score nowhere."""
    targets = np.zeros((len(records), len(answer_index)), dtype=np.float32)
    for row, record in enumerate(records):
        for answer, score in answer_scores(record["answers"]).items():
            if answer in answer_index:
                targets[row, answer_index[answer]] = score
    return torch.from_numpy(targets).to(torch.float16)


def _prepare_tokenizer(data: DataConfig, train: list[VqaRecord], out: Path) -> BertTokenizerFast:
    """Write the tokenizer to `out` and return it (the teacher's vocabulary when it has one)."""
    with atomic_path(out) as temp:
        if data.tokenizer is not None:
            tokenizer = load_tokenizer(data.tokenizer)
            save_tokenizer(tokenizer, temp)
        else:
            # The vocabulary comes from every train question, not only those kept by `limit`,
            # so a smoke run tokenises like the full run.
            questions = [record["question"] for record in train]
            tokenizer = train_wordpiece(questions, data.vocab_size, temp)
    return tokenizer


def _carve_val(
    records: list[VqaRecord], fraction: float, seed: int
) -> tuple[list[VqaRecord], list[VqaRecord]]:
    try:
        return split_off_by_image(records, fraction, seed)
    except ValueError as error:
        raise DataError(f"data train: cannot carve a val split ({error})") from error
