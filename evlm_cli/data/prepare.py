"""The prepare stages' library: read a dataset once and write tensors later stages load fast.

Two kinds of data are prepared: a task's (VQA questions, retrieval and captioning captions,
NLVR2 statements) and the task-agnostic image-text pairs of pre-training, which also own the
tokenizer every task uses (the pre-trained text encoder's vocabulary).

Layout of the output directory:
- the images, each source image once across splits, in one of two stores (`images.py`):
  `images.safetensors`, `images` uint8 [N_images, 3, S, S] decoded (storage `memory`), or
  `images.json`, the list of image files to decode as batches are drawn (storage `files`).
  Either way prepare decodes every image once, and an unreadable one stops it (or, with
  `skip_bad_images`, drops the examples that show it);
- `<split>.safetensors` per split, one row per text: `image_index` int64 [N] (NLVR2: [N, 2],
  the left and the right image), `input_ids` int32 [N, L], `attention_mask` uint8 [N, L]; for
  VQA and NLVR2 also `targets` float16 [N, A] and `question_id` int64 [N]; for captions also
  `image_group` int64 [N] (`caption_groups`). VQA's targets are
  the official accuracy of each answer (see `evlm_cli.tasks.vqa.answer_scores`); NLVR2's are one-hot over the answers
  `NLVR2_ANSWERS` and its question ids are row indices. Retrieval and captioning evaluation
  splits list every caption of an image as its own row;
- `answers.json` (index order; empty without answers), `tokenizer/` (HF format), `meta.json`;
- VQA only: `annotations.json`, `{split: {question_id, answers, answer_type}}` for val and
  test, row by row: every annotator's answer as the source gives it, for the official metric;
- captioning only: `references.json`, `{split: {str(image row): [caption, ...]}}` for val and
  test, every reference caption of an image as the source gives it (untruncated, untokenised,
  in source order) for the caption metrics. Every caption row's text begins with
  `data.caption_prompt`, whose tokens `meta.json` holds as `caption_prompt_ids`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from evlm_cli.core.config import DataConfig, PairsConfig
from evlm_cli.core.errors import DataError
from evlm_cli.core.io import atomic_path, atomic_save_safetensors, atomic_write_json
from evlm_cli.data.captions import read_easy_vqa_pairs, read_easy_vqa_retrieval
from evlm_cli.data.easy_vqa import easy_vqa_answers, read_easy_vqa
from evlm_cli.data.images import (
    describe_bad,
    keep_rows,
    resolve_storage,
    scan_images,
    write_store,
)
from evlm_cli.data.mosaic import ANSWERS as MOSAIC_ANSWERS
from evlm_cli.data.mosaic import read_easy_vqa_mosaic
from evlm_cli.data.nlvr2 import read_easy_vqa_nlvr2
from evlm_cli.data.prepared_files import ANNOTATIONS
from evlm_cli.data.records import (
    Nlvr2Record,
    PairRecord,
    RetrievalRecord,
    VqaRecord,
    split_off_by_image,
    split_off_pairs_by_image,
)
from evlm_cli.data.sources import RENDERED_SOURCES, source_problems
from evlm_cli.data.tokenizer import load_tokenizer, save_tokenizer, train_wordpiece
from evlm_cli.data.xvlm_json import (
    read_answer_list,
    read_nlvr2,
    read_pairs,
    read_retrieval_eval,
    read_vqa,
)
from evlm_cli.tasks.caption import check_prompted, prompt_ids
from evlm_cli.tasks.vqa import answer_scores

if TYPE_CHECKING:  # transformers is slow to import: only functions that build a
    from transformers import BertTokenizerFast  # tokenizer import it

SPLITS = ("train", "val", "test")
# Pixels are stored raw; loaders map them to [-1, 1] with this per-channel mean and std.
PIXEL_MEAN = (0.5, 0.5, 0.5)
PIXEL_STD = (0.5, 0.5, 0.5)
# NLVR2 is classification over two answers, so a label's index is int(label) and the VQA
# machinery (one-hot targets, cross-entropy, accuracy by argmax) serves it unchanged.
NLVR2_ANSWERS = ("false", "true")
# The evaluation splits whose reference captions a captioning task keeps.
REFERENCE_SPLITS = ("val", "test")
# An xvlm-json reader: (annotation files, image root) -> records.
Reader = Callable[[Sequence[str], str], list]


def prepare(data: DataConfig, task: str, seed: int, out_dir: Path, tokenizer: Path) -> dict:
    """Read the task dataset `data` names and write the prepared files into `out_dir`.

    `tokenizer` is the pre-training data's tokenizer folder: a task tokenises as its
    pre-trained teacher did. Returns a summary: examples per split, images, answers, vocabulary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Sources that render their images (mosaics) write them here; they are decoded below.
    with TemporaryDirectory(prefix="evlm-render-") as scratch:
        full_splits, answers = read_task_splits(data, task, seed, Path(scratch))
        text = load_tokenizer(tokenizer)
        save_tokenizer(text, out / "tokenizer")  # a prepared folder is self-contained
        limited = {name: limit_examples(records, data.limit, seed, SPLITS.index(name))
                   for name, records in full_splits.items()}
        references = ({name: limited[name] for name in REFERENCE_SPLITS if name in limited}
                      if task == "captioning" else None)
        rows = {name: _rows(records) for name, records in limited.items()}
        about = {"source": data.source, "task": task}
        if task == "captioning":
            # Trained as X-VLM trains, with the prompt in front; the references stay unprompted.
            rows = {name: [{**row, "caption": data.caption_prompt + row["caption"]}
                           for row in split] for name, split in rows.items()}
            about["caption_prompt_ids"] = prompt_ids(text, data.caption_prompt)
        if task == "vqa":  # every stage that trains on this data reads the objective here
            about["vqa_loss"] = data.vqa_loss
        return write_prepared(out, rows, answers, text, data.image_size, data.max_text_len,
                              about, references,
                              images=ImageOptions("data", _storage(data), data.skip_bad_images))


def _storage(data: DataConfig) -> str:
    return "memory" if data.source in RENDERED_SOURCES else data.storage


def prepare_pairs(pairs: PairsConfig, seed: int, out_dir: Path) -> dict:
    """Read the pre-training image-text pairs and write them, with the tokenizer, to `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full_splits = read_pair_splits(pairs, seed)
    text = _prepare_tokenizer(pairs.tokenizer, pairs.vocab_size,
                              [record["caption"] for record in full_splits["train"]],
                              out / "tokenizer")
    splits = {name: limit_examples(records, pairs.limit, seed, SPLITS.index(name))
              for name, records in full_splits.items()}
    return write_prepared(out, splits, [], text, pairs.image_size, pairs.max_text_len,
                          {"source": pairs.source, "task": "pretrain"},
                          images=ImageOptions("pairs", pairs.storage, pairs.skip_bad_images))


@dataclass(frozen=True)
class ImageOptions:
    """How prepare stores images, and whether it drops examples whose images are unreadable;
    `section` (data or pairs) names the spec keys in messages."""

    section: str = "data"
    storage: str = "auto"
    skip_bad: bool = False


def write_prepared(out: Path, splits: dict[str, list], answers: list[str],
                   tokenizer: BertTokenizerFast, image_size: int, max_text_len: int,
                   about: dict, references: dict[str, list] | None = None,
                   images: ImageOptions = ImageOptions()) -> dict:
    """Write the images, each split's tensors, the answers, `meta.json` and, given
    `references` (records with captions, per split), `references.json`; return a summary."""
    image_paths = unique_images(splits)
    storage = resolve_storage(images.storage, len(image_paths), image_size)
    scan = scan_images(image_paths, image_size, keep_pixels=storage == "memory")
    skipped = {}
    if scan.bad:
        problem = describe_bad(scan.bad, len(image_paths))
        if not images.skip_bad:
            raise DataError(f"{images.section}: {problem}; fix or remove them, or set "
                            f"{images.section}.skip_bad_images: true to drop their examples")
        splits, dropped = drop_examples(splits, set(scan.bad), images.section)
        if references is not None:
            references, _ = drop_examples(references, set(scan.bad), images.section)
        kept_paths = unique_images(splits)
        if scan.pixels is not None:
            row = {path: index for index, path in enumerate(image_paths)}
            scan.pixels = keep_rows(scan.pixels, [row[p] for p in kept_paths])
        image_paths = kept_paths
        skipped = {"skipped_images": len(scan.bad), "skipped_examples": dropped}
        tqdm.write(f"warning: prepare: {problem}; skipped, with their {dropped} examples")
    image_row = {path: row for row, path in enumerate(image_paths)}
    write_store(out, storage, image_paths, scan.pixels)
    answer_index = {answer: index for index, answer in enumerate(answers)}
    split_meta = {}
    for name, records in splits.items():
        tensors = encode_split(records, image_row, answer_index, tokenizer, max_text_len)
        if "caption_prompt_ids" in about:
            check_prompted(tensors["input_ids"], tokenizer.cls_token_id,
                           about["caption_prompt_ids"], "data.caption_prompt")
        atomic_save_safetensors(out / f"{name}.safetensors", tensors)
        split_meta[name] = {
            "examples": len(records),
            "images": len({image for record in records for image in record_images(record)}),
            "labelled": all(record.get("answers", True) for record in records),
        }
    atomic_write_json(out / "answers.json", answers)
    if splits and all(records and "question" in records[0] for records in splits.values()):
        atomic_write_json(out / ANNOTATIONS, {name: vqa_annotations(records)
                                              for name, records in splits.items()
                                              if name in REFERENCE_SPLITS})
    if references is not None:
        atomic_write_json(out / "references.json",
                          {name: reference_captions(records, image_row)
                           for name, records in references.items()})
    special = sorted({tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
                      tokenizer.unk_token_id, tokenizer.mask_token_id} - {None})
    meta = {
        **about,
        "storage": storage,
        **skipped,
        "splits": split_meta,
        "num_images": len(image_paths),
        "num_answers": len(answers),
        "image_size": image_size,
        "max_text_len": max_text_len,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "special_token_ids": special,
        "pixel_mean": list(PIXEL_MEAN),
        "pixel_std": list(PIXEL_STD),
    }
    atomic_write_json(out / "meta.json", meta)
    return {
        "splits": {name: info["examples"] for name, info in split_meta.items()},
        "storage": storage,
        **skipped,
        "num_images": len(image_paths),
        "num_answers": len(answers),
        "vocab_size": len(tokenizer),
    }


def read_task_splits(data: DataConfig, task: str, seed: int, scratch: Path | None = None
                     ) -> tuple[dict[str, list], list[str]]:
    """Records per split (train, val and, when present, test) and the answer list (VQA, NLVR2).

    easy-VQA carves val from train by image. So does xvlm-json when no val file is given.
    A source that renders its images (easy-vqa-mosaic) writes them under `scratch`, which must
    exist until they are decoded.
    """
    problems = source_problems(data.source, task, data.train, data.test, data.image_root,
                               data.answer_list)
    if problems:
        field, message = problems[0]
        raise DataError(f"data {field}: {message}")
    if task in ("retrieval", "captioning"):
        return read_retrieval_splits(data, seed), []
    if task == "nlvr2":
        return read_nlvr2_splits(data, seed), list(NLVR2_ANSWERS)
    if task != "vqa":
        raise DataError(f"prepare reads VQA, NLVR2, retrieval and captioning data, not task {task!r}")
    if data.source == "easy-vqa":
        return read_easy_vqa(data.val_fraction, seed), easy_vqa_answers()
    if data.source == "easy-vqa-mosaic":
        if scratch is None:
            raise ValueError("easy-vqa-mosaic renders its mosaics: give a scratch folder")
        return read_easy_vqa_mosaic(data.val_fraction, seed, scratch), list(MOSAIC_ANSWERS)
    labelled = partial(read_vqa, require_answers=True)
    splits = read_xvlm_splits(data, seed, labelled, labelled,
                              partial(read_vqa, require_answers=False))
    answers = read_answer_list(data.answer_list)
    known = set(answers)
    if not any(known & set(record["answers"]) for record in splits["train"]):
        raise DataError(f"answer list {data.answer_list}: none of the train questions' answers "
                        f"is in it ({len(answers)} answers; train has, e.g., "
                        f"{splits['train'][0]['answers'][:3]})")
    return splits, answers


def read_xvlm_splits(data: DataConfig, seed: int, read_train: Reader, read_eval: Reader,
                     read_test: Reader | None = None,
                     split_off: Callable[[list, float, int], tuple[list, list]] = split_off_by_image
                     ) -> dict[str, list]:
    """An xvlm-json task's splits: train, val from its files or carved from train by
    `split_off`, and test when given. `read_eval` reads val (and test, unless `read_test`)."""
    splits = {"train": read_train(list(data.train), data.image_root)}
    if data.val:
        splits["val"] = read_eval(list(data.val), data.image_root)
    else:
        splits["train"], splits["val"] = _carve_val(splits["train"], data.val_fraction, seed,
                                                    split_off)
    if data.test:
        splits["test"] = (read_test or read_eval)(list(data.test), data.image_root)
    return splits


def read_retrieval_splits(data: DataConfig, seed: int) -> dict[str, list]:
    """Train pairs; val and test as images with all their captions (retrieval and captioning).

    A val carved from the train pairs holds pairs, one per caption, not images with captions.
    """
    if data.source == "easy-vqa":
        return read_easy_vqa_retrieval(data.val_fraction, seed)
    return read_xvlm_splits(data, seed, read_pairs, read_retrieval_eval)


def read_nlvr2_splits(data: DataConfig, seed: int) -> dict[str, list[Nlvr2Record]]:
    """Train, val and test statements about image pairs.

    A val carved from train moves whole groups of images that share pairs
    (`split_off_pairs_by_image`), so no image serves both splits and no pair is dropped.
    """
    if data.source == "easy-vqa":
        return read_easy_vqa_nlvr2(data.val_fraction, seed)
    return read_xvlm_splits(data, seed, read_nlvr2, read_nlvr2,
                            split_off=split_off_pairs_by_image)


def read_pair_splits(pairs: PairsConfig, seed: int) -> dict[str, list[PairRecord]]:
    """Pre-training pairs: train, and val carved from it by image."""
    if pairs.source == "easy-vqa":
        return read_easy_vqa_pairs(pairs.val_fraction, seed)
    if pairs.source != "xvlm-json" or not pairs.train or not pairs.image_root:
        raise DataError(f"pairs: source {pairs.source!r} needs train files and an image_root")
    train, val = _carve_val(read_pairs(list(pairs.train), pairs.image_root), pairs.val_fraction,
                            seed)
    return {"train": train, "val": val}


def _rows(records: list) -> list:
    """One row per text: an image with several captions becomes a row per caption."""
    rows = []
    for record in records:
        if "captions" in record:
            rows += [PairRecord(image=record["image"], caption=c) for c in record["captions"]]
        else:
            rows.append(record)
    return rows


def limit_examples(records: list, limit: int | None, seed: int, stream: int) -> list:
    """The first `limit` records of a seeded shuffle, back in source order; all when no limit."""
    if limit is None or len(records) <= limit:
        return records
    chosen = np.random.default_rng([seed, stream]).permutation(len(records))[:limit]
    return [records[index] for index in sorted(chosen.tolist())]


def unique_images(splits: dict[str, list]) -> list[str]:
    """Every image path once, in order of first use over the splits (left before right)."""
    return list(dict.fromkeys(image for records in splits.values() for record in records
                              for image in record_images(record)))


def record_images(record: VqaRecord | PairRecord | RetrievalRecord | Nlvr2Record) -> list[str]:
    """The images a record shows: two for NLVR2, one otherwise."""
    return record["images"] if "images" in record else [record["image"]]


def reference_captions(records: list, image_row: dict[str, int]) -> dict[str, list[str]]:
    """Every caption of each image, keyed by its image row as a string (a JSON key), in order.

    Records are images with their captions or, in a val carved from train, single pairs; an
    image listed twice keeps the captions of both.
    """
    references: dict[str, list[str]] = {}
    for record in records:
        captions = record["captions"] if "captions" in record else [record["caption"]]
        references.setdefault(str(image_row[record["image"]]), []).extend(captions)
    return references


def drop_examples(splits: dict[str, list], bad: set[str], section: str
                  ) -> tuple[dict[str, list], int]:
    """The splits without the records that show a bad image, and how many were dropped."""
    kept = {name: [r for r in records if not bad & set(record_images(r))]
            for name, records in splits.items()}
    empty = [name for name, records in kept.items() if splits[name] and not records]
    if empty:
        raise DataError(f"{section}: every example of split {empty[0]!r} shows an unreadable "
                        "image; nothing is left to prepare")
    return kept, sum(len(splits[n]) - len(kept[n]) for n in splits)


def encode_split(
    records: list,
    image_row: dict[str, int],
    answer_index: dict[str, int],
    tokenizer: BertTokenizerFast,
    max_text_len: int,
) -> dict[str, torch.Tensor]:
    """Tensors of one split: image rows, padded token ids and mask; for questions (VQA) also
    soft targets and question ids, for statements (NLVR2) one-hot targets and row indices."""
    count = len(records)
    text_key = next((key for key in ("question", "sentence") if records and key in records[0]),
                    "caption")
    encoded = tokenizer(
        [record[text_key] for record in records],
        padding="max_length",
        truncation=True,
        max_length=max_text_len,
        return_attention_mask=True,
        return_token_type_ids=False,
    )
    input_ids = torch.tensor(encoded["input_ids"], dtype=torch.int32).reshape(count, max_text_len)
    mask = torch.tensor(encoded["attention_mask"], dtype=torch.uint8).reshape(count, max_text_len)
    if text_key == "sentence":
        rows = [[image_row[image] for image in r["images"]] for r in records]
        image_index = torch.tensor(rows, dtype=torch.int64).reshape(count, 2)
    else:
        image_index = torch.tensor([image_row[r["image"]] for r in records], dtype=torch.int64)
    tensors = {
        "image_index": image_index,
        "input_ids": input_ids,
        "attention_mask": mask,
    }
    if text_key == "caption":
        tensors["image_group"] = caption_groups(records, image_index)
    if text_key == "question":
        tensors["targets"] = target_scores(records, answer_index)
        tensors["question_id"] = torch.tensor([r["question_id"] for r in records],
                                              dtype=torch.int64)
    elif text_key == "sentence":
        tensors["targets"] = label_targets(records, answer_index)
        tensors["question_id"] = torch.arange(count, dtype=torch.int64)
    return tensors


def caption_groups(records: list, image_index: torch.Tensor) -> torch.Tensor:
    """int64 [N]: for each caption row, the lowest image row among the images whose captions
    in this split are the same set as its image's (case and spacing aside): images the text
    cannot tell apart. On captions written per image (COCO) every image is its own group; on
    captions derived from a few facts (the easy-VQA demo) images with the same facts share
    one, and text assignment draws no negative from a text's own group."""
    said: dict[int, set[str]] = {}
    for record, row in zip(records, image_index.tolist(), strict=True):
        said.setdefault(row, set()).add(" ".join(record["caption"].lower().split()))
    first: dict[frozenset[str], int] = {}
    group = {row: first.setdefault(frozenset(texts), row) for row, texts in sorted(said.items())}
    return torch.tensor([group[row] for row in image_index.tolist()], dtype=torch.int64)


def target_scores(records: list[VqaRecord], answer_index: dict[str, int]) -> torch.Tensor:
    """float16 [N, A]: the official VQA accuracy each answer of the list would score."""
    targets = np.zeros((len(records), len(answer_index)), dtype=np.float32)
    candidates = list(answer_index)
    for row, record in enumerate(records):
        for column, score in answer_scores(record["answers"], candidates).items():
            targets[row, column] = score
    return torch.from_numpy(targets).to(torch.float16)


def vqa_annotations(records: list[VqaRecord]) -> dict:
    """What the official VQA metric reads for a split, row by row: each question's id, every
    annotator's answer, and its answer type where the data gives one."""
    types = [record.get("answer_type") for record in records]
    return {"question_id": [record["question_id"] for record in records],
            "answers": [record["answers"] for record in records],
            "answer_type": types if any(t is not None for t in types) else None}


def label_targets(records: list[Nlvr2Record], answer_index: dict[str, int]) -> torch.Tensor:
    """float16 [N, 2] one-hot over `NLVR2_ANSWERS`: a true statement scores "true"."""
    targets = torch.zeros((len(records), len(answer_index)), dtype=torch.float16)
    columns = [answer_index[NLVR2_ANSWERS[int(record["label"])]] for record in records]
    targets[torch.arange(len(records)), torch.tensor(columns, dtype=torch.int64)] = 1.0
    return targets


def _prepare_tokenizer(given: str | None, vocab_size: int, texts: list[str],
                       out: Path) -> BertTokenizerFast:
    """Write the tokenizer to `out` and return it: the one given, or a WordPiece trained on
    every train text (not only those kept by `limit`, so a smoke run tokenises like the full
    run)."""
    with atomic_path(out) as temp:
        if given is not None:
            tokenizer = load_tokenizer(given)
            save_tokenizer(tokenizer, temp)
        else:
            tokenizer = train_wordpiece(texts, vocab_size, temp)
    return tokenizer


def _carve_val(records: list, fraction: float, seed: int,
               split_off: Callable[[list, float, int], tuple[list, list]] = split_off_by_image
               ) -> tuple[list, list]:
    try:
        return split_off(records, fraction, seed)
    except ValueError as error:
        raise DataError(f"data train: cannot carve a val split ({error})") from error
