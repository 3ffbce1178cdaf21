"""Where a prepared folder keeps its images, and how they are decoded.

Two stores, chosen at prepare time (`storage`):

- `memory`: every image decoded once into one uint8 tensor, `images.safetensors`, which a
  stage loads whole. Fast, and its size grows with the dataset: 5,000 easy-VQA images at 64 px
  are 61 MB, but VQAv2's 123k COCO images at X-VLM's 384 px would be 54 GB.
- `files`: `images.json` lists the image files, and batches decode them as they are drawn (in
  `torch.utils.data` workers). Memory stays flat whatever the dataset's size, and no second,
  decoded copy of the dataset lands on disk or in DVC's cache. Prepare still decodes every
  image once, to find unreadable ones before any training starts.

`auto` keeps the pixels in memory up to `MEMORY_LIMIT_BYTES` decoded, and reads files beyond.
The measurement behind the choice of files over a memory-mapped decoded store is in
`benchmarks/data_scale.py` and docs/results/data_scale.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from evlm_cli.core.errors import DataError
from evlm_cli.core.io import atomic_save_safetensors, atomic_write_json
from evlm_cli.data.prepared_files import load_tensors, read_json

STORAGES = ("auto", "memory", "files")
# `auto` holds decoded pixels in memory up to this size: easy-VQA (61 MB) and its mosaics
# (123 MB) stay on the fast path, a full-size dataset streams from its files.
MEMORY_LIMIT_BYTES = 1 << 30
TENSOR_FILE = "images.safetensors"
FILES_FILE = "images.json"
# The errors PIL raises for a missing, truncated or malformed file (a broken PNG raises
# SyntaxError; an oversized one DecompressionBombError).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
# How many unreadable images an error message names before it gives the count alone.
NAMED = 3


def decode_image(path: str | os.PathLike, size: int) -> torch.Tensor:
    """An image file as uint8 [3, size, size] RGB, resized (bicubic) when it is another size.

    A JPEG much larger than `size` is decoded at a reduced scale first (PIL's draft mode, DCT
    scaling, never below `size`), which is several times faster than decoding it whole.
    Raises one of `DECODE_ERRORS` for a file that cannot be read.
    """
    with Image.open(path) as image:
        image.draft("RGB", (size, size))
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)


def resolve_storage(storage: str, count: int, size: int) -> str:
    """`memory` or `files` for `count` images of `size` px (`auto` decides by decoded size)."""
    if storage not in STORAGES:
        raise ValueError(f"unknown storage {storage!r} (expected one of: {', '.join(STORAGES)})")
    if storage != "auto":
        return storage
    return "memory" if count * 3 * size * size <= MEMORY_LIMIT_BYTES else "files"


@dataclass
class Scan:
    """What prepare found in the images: a tensor of those decoded (memory storage only) and
    the unreadable ones with why, in path order."""

    pixels: torch.Tensor | None
    bad: dict[str, str]


def scan_images(paths: Sequence[str], size: int, keep_pixels: bool) -> Scan:
    """Decode every image once, in constant memory unless `keep_pixels`; never stop at a bad one."""
    bad: dict[str, str] = {}
    pixels = torch.zeros((len(paths), 3, size, size), dtype=torch.uint8) if keep_pixels else None
    for row, path in enumerate(tqdm(paths, desc="decode images", unit="img")):
        try:
            image = decode_image(path, size)
        except DECODE_ERRORS as error:
            bad[path] = ("missing" if isinstance(error, FileNotFoundError)
                         else f"cannot be decoded: {error}")
            continue
        if pixels is not None:
            pixels[row] = image
    return Scan(pixels, bad)


def keep_rows(pixels: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`pixels[rows]` for increasing `rows`, moved down in place: no second copy of the
    images (up to `MEMORY_LIMIT_BYTES`) is made. Returns a view of the first len(rows)."""
    for new, old in enumerate(rows):
        if new != old:
            pixels[new] = pixels[old]
    return pixels[:len(rows)]


def describe_bad(bad: dict[str, str], total: int) -> str:
    """"N of M images cannot be read: a (why), b (why), ... and K more"."""
    named = [f"{path} ({why})" for path, why in list(bad.items())[:NAMED]]
    more = f", and {len(bad) - NAMED} more" if len(bad) > NAMED else ""
    return f"{len(bad)} of {total} images cannot be read: {', '.join(named)}{more}"


def write_store(out: Path, storage: str, paths: list[str], pixels: torch.Tensor | None) -> None:
    """Write the chosen store: the decoded tensor, or the list of files (as the readers gave
    them: relative paths stay relative to the project root, where stages run)."""
    if storage == "memory":
        if pixels is None or pixels.shape[0] != len(paths):
            raise ValueError("memory storage needs the decoded pixels of every kept image")
        atomic_save_safetensors(out / TENSOR_FILE, {"images": pixels})
    else:
        atomic_write_json(out / FILES_FILE, list(paths))


class TensorImages:
    """Images held in memory: indexing is one tensor gather."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.pixels = pixels

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.pixels[rows]


class FileImages:
    """Images decoded from their files on every access: nothing is held but the paths.

    The paths are one numpy bytes array, not a list of str: forked data workers would copy
    the pages of a list's objects as they touch their reference counts, a copy per worker
    that grows with the dataset.
    """

    def __init__(self, paths: list[str], size: int, source: Path) -> None:
        self.paths = np.array([p.encode() for p in paths], dtype=np.bytes_)
        self._size, self.source = size, source

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        """uint8 [*rows.shape, 3, S, S]."""
        flat = rows.reshape(-1).tolist()
        out = torch.empty((len(flat), 3, self._size, self._size), dtype=torch.uint8)
        for i, row in enumerate(flat):
            path = self.paths[row].decode()
            try:
                out[i] = decode_image(path, self._size)
            except DECODE_ERRORS as error:
                raise DataError(f"image {path} (listed in {self.source}): cannot be read "
                                f"({error}); it was readable at prepare time, so it changed "
                                "since: restore it or prepare again") from None
        return out.reshape(*rows.shape, 3, self._size, self._size)


def open_store(directory: Path, storage: str, size: int) -> TensorImages | FileImages:
    """The image store of a prepared folder, as its meta.json names it."""
    if storage == "files":
        path = directory / FILES_FILE
        paths = read_json(path)
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{path}: expected a list of image paths; prepare again")
        return FileImages(paths, size, path)
    if storage != "memory":
        raise DataError(f"{directory / 'meta.json'}: unknown image storage {storage!r}; "
                        "prepare again")
    return TensorImages(load_tensors(directory / TENSOR_FILE)["images"])

