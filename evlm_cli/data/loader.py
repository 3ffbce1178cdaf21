"""Batches from a prepared directory by whole-tensor indexing: no per-example Python in the loop."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from evlm_cli.data.tokenizer import load_tokenizer
from evlm_cli.errors import DataError

if TYPE_CHECKING:  # transformers costs ~2 s to import: only functions that build a
    from transformers import BertTokenizerFast  # tokenizer import it

Batch = dict[str, torch.Tensor]


class PreparedData:
    """A prepared directory: meta, answers, the shared image tensor and its splits."""

    def __init__(self, prepared_dir: str | os.PathLike) -> None:
        self.directory = Path(prepared_dir)
        self.meta = _read_json(self.directory / "meta.json")
        if not isinstance(self.meta, dict) or not isinstance(self.meta.get("splits"), dict):
            raise DataError(f"{self.directory / 'meta.json'}: not the meta of a prepared folder "
                            "(expected an object with its splits); prepare again")
        self.answers: list[str] = _read_json(self.directory / "answers.json")
        if not isinstance(self.answers, list) or not all(isinstance(a, str) for a in self.answers):
            raise DataError(f"{self.directory / 'answers.json'}: expected a list of answers "
                            f"(strings), got {type(self.answers).__name__}; prepare again")
        if len(self.answers) != self.meta.get("num_answers", len(self.answers)):
            raise DataError(f"{self.directory / 'answers.json'}: {len(self.answers)} answers, "
                            f"meta.json says {self.meta['num_answers']}; prepare again")
        self._images: torch.Tensor | None = None

    @property
    def images(self) -> torch.Tensor:
        """uint8 [N_images, 3, S, S], loaded on first use and shared by every split."""
        if self._images is None:
            self._images = _load_tensors(self.directory / "images.safetensors")["images"]
        return self._images

    @property
    def split_names(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def num_answers(self) -> int:
        return len(self.answers)

    def split(self, name: str) -> PreparedSplit:
        if name not in self.meta["splits"]:
            raise DataError(f"{self.directory}: no split {name!r} (has {', '.join(self.split_names)})")
        return PreparedSplit(self.directory, name, images=self.images,
                             pixel_mean=self.meta["pixel_mean"], pixel_std=self.meta["pixel_std"])

    def tokenizer(self) -> BertTokenizerFast:
        return load_tokenizer(self.directory / "tokenizer")

    def references(self, split: str) -> dict[int, list[str]]:
        """A captioning split's reference captions: image row -> captions, raw, in source order."""
        path = self.directory / "references.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; reference captions are prepared for the captioning "
                            f"task only (this is {self.meta.get('task')!r} data)")
        by_split = _read_json(path)
        if split not in by_split:
            raise DataError(f"{path}: no reference captions for split {split!r} "
                            f"(has {', '.join(by_split) or 'none'})")
        return {int(row): captions for row, captions in by_split[split].items()}


class PreparedSplit(Dataset):
    """One split of a prepared directory; `batches` is the fast path, indexing the slow one."""

    def __init__(
        self, prepared_dir: str | os.PathLike, split: str, images: torch.Tensor | None = None,
        pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None,
    ) -> None:
        directory = Path(prepared_dir)
        self.name = split
        if images is None or pixel_mean is None or pixel_std is None:
            data = PreparedData(directory)
            images = data.images if images is None else images
            pixel_mean = data.meta["pixel_mean"] if pixel_mean is None else pixel_mean
            pixel_std = data.meta["pixel_std"] if pixel_std is None else pixel_std
        self.images = images
        # (x / 255 - mean) / std per channel, as prepare recorded it, folded into one multiply-add
        std = torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1) / std
        tensors = _load_tensors(directory / f"{split}.safetensors")
        self.image_index = tensors["image_index"]
        self.input_ids = tensors["input_ids"]
        self.attention_mask = tensors["attention_mask"]
        # Questions and NLVR2 statements have answer targets and ids; captions have neither.
        self.targets = tensors.get("targets")
        self.question_id = tensors.get("question_id")

    def __len__(self) -> int:
        return self.image_index.shape[0]

    def __getitem__(self, index: int) -> Batch:
        batch = self.gather(torch.tensor([index]))
        return {key: value[0] for key, value in batch.items()}

    def gather(self, indices: torch.Tensor) -> Batch:
        """The examples at `indices` as one batch, images normalised as prepare recorded.

        `images` is [B, 3, S, S], or [B, 2, 3, S, S] for NLVR2's pairs (image_index [B, 2]).
        """
        pixels = self.images[self.image_index[indices]]
        batch = {
            "images": pixels.float().mul_(self._scale).sub_(self._shift),
            "input_ids": self.input_ids[indices].long(),
            "attention_mask": self.attention_mask[indices].long(),
            # which image a row shows: captions of one image are each other's positives (ITC)
            # (NLVR2: both images, left then right)
            "image_index": self.image_index[indices],
        }
        if self.targets is not None:
            batch["targets"] = self.targets[indices].float()
            batch["question_id"] = self.question_id[indices]
        return batch

    def images_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The normalised images of the given image rows."""
        return self.images[rows].float().mul_(self._scale).sub_(self._shift)

    def answer_weights(self, balance: float) -> torch.Tensor:
        """Sampling weight per example: (count of its top answer) ** -balance.

        0 = every example equally likely; 1 = every answer equally often. Answer imbalance can
        starve an attribute: in easy-VQA, yes/no make up 74% of the questions and the three
        shape answers 13% together, too little signal for a vision encoder trained from
        scratch to learn shape. An unlabelled example (no scored answer) gets weight 0.
        """
        if not 0.0 <= balance <= 1.0:
            raise ValueError(f"answer balance must be in [0, 1], got {balance}")
        if self.targets is None:
            raise ValueError(f"split {self.name!r} has no answers to balance: set answer_balance "
                             "to 0 for image-text pairs")
        targets = self.targets.float()
        labelled = targets.amax(1) > 0
        top = targets.argmax(1)
        counts = torch.bincount(top[labelled], minlength=targets.shape[1]).double()
        weights = counts[top].clamp(min=1.0).pow(-balance)
        return torch.where(labelled, weights, torch.zeros_like(weights))

    def shard_indices(
        self, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This rank's example indices, as `DistributedSampler` deals them.

        The order is a permutation seeded by (seed, epoch) when shuffling, else source order.
        With `weights` (one per example), an epoch instead draws as many examples as the split
        holds, with replacement, each with probability proportional to its weight.
        With several ranks the list is padded by wrapping around so all ranks get the same
        count (and so the same number of steps); a metric over all ranks then sees a few
        examples twice, which `question_id` lets the caller drop.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        count = len(self)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if weights is not None:
            if weights.shape != (count,) or not bool((weights >= 0).all()) or not weights.sum() > 0:
                raise ValueError(f"weights must be {count} non-negative numbers, not all zero")
            order = torch.multinomial(weights.double(), count, replacement=True, generator=generator)
        elif shuffle:
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        per_rank = math.ceil(count / world_size)
        padding = per_rank * world_size - count
        if padding and count:
            order = torch.cat([order, order.repeat(math.ceil(padding / count))[:padding]])
        return order[rank::world_size]

    def num_batches(self, batch_size: int, world_size: int = 1, drop_last: bool = False) -> int:
        """Batches per rank per epoch."""
        per_rank = math.ceil(len(self) / world_size)
        return per_rank // batch_size if drop_last else math.ceil(per_rank / batch_size)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Yield this rank's batches for one epoch (see `shard_indices` for the order)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        indices = self.shard_indices(shuffle, seed, epoch, rank, world_size)
        for start in range(0, self.num_batches(batch_size, world_size, drop_last) * batch_size, batch_size):
            yield self.gather(indices[start : start + batch_size])



def _read_json(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); prepare again") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise DataError(f"{path}: missing; run the prepare stage first")
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises its own error type for a corrupt header
        raise DataError(f"{path}: cannot be read as safetensors ({error})") from error
