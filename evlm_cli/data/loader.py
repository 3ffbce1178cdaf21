"""Batches from a prepared directory.

Images held in memory are gathered by whole-tensor indexing, with no per-example Python; images
read from files are decoded per example. Either way a batch is built by `PreparedSplit.gather`
from its indices (and, in training, a seed for its augmentation), and `stream` runs that in
`torch.utils.data` worker processes when asked. The order of the batches is decided up front
(`PreparedSplit.shard_indices`), so workers change how fast batches come, never which.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from evlm_cli.core.config import AugmentConfig, Resources
from evlm_cli.core.errors import DataError, EvlmError
from evlm_cli.data.augment import Augmenter, SideSwap
from evlm_cli.data.images import FileImages, TensorImages, open_store
from evlm_cli.data.prepared_files import ANNOTATIONS, load_tensors, read_json
from evlm_cli.data.tokenizer import load_tokenizer

if TYPE_CHECKING:  # transformers is slow to import: only functions that build a
    from transformers import BertTokenizerFast  # tokenizer import it

Batch = dict[str, torch.Tensor]
# What a batch is built from: its example indices and its augmentation seed (None: none).
BatchKey = tuple[torch.Tensor, tuple[int, ...] | None]
# auto workers never start more than this many per training process.
MAX_AUTO_WORKERS = 4


def resolve_workers(requested: int | None, in_memory: bool, augmenting: bool,
                    processes: int = 1) -> int:
    """Data workers per process: as requested, or (None) 0 when there is nothing to do off the
    main process (images in memory, no augmentation), else up to `MAX_AUTO_WORKERS`, leaving
    one core per training process."""
    if requested is not None:
        return requested
    if in_memory and not augmenting:
        return 0
    spare = (os.cpu_count() or 1) // max(1, processes) - 1
    return max(1, min(MAX_AUTO_WORKERS, spare))


def open_prepared(path: str | os.PathLike, resources: Resources | None = None,
                  augment: AugmentConfig | None = None) -> PreparedData:
    """A stage's prepared data, its batches built by `resources.data_workers` workers (see
    `resolve_workers`; a training stage passes its `augment`, which needs them more)."""
    data = PreparedData(path)
    if resources is not None:
        data.workers = resolve_workers(resources.data_workers, data.storage == "memory",
                                       augment is not None and augment.enabled,
                                       resources.processes)
    return data


class PreparedData:
    """A prepared directory: meta, answers, the shared image tensor and its splits."""

    def __init__(self, prepared_dir: str | os.PathLike, workers: int = 0) -> None:
        self.directory = Path(prepared_dir)
        self.workers = workers  # data worker processes for every split's batches
        self.meta = read_json(self.directory / "meta.json")
        if (not isinstance(self.meta, dict) or not isinstance(self.meta.get("splits"), dict)
                or self.meta.get("storage") not in ("memory", "files")):
            raise DataError(f"{self.directory / 'meta.json'}: not the meta of a prepared folder "
                            "(expected an object with its splits and its image storage); "
                            "prepare again")
        self.answers: list[str] = read_json(self.directory / "answers.json")
        if not isinstance(self.answers, list) or not all(isinstance(a, str) for a in self.answers):
            raise DataError(f"{self.directory / 'answers.json'}: expected a list of answers "
                            f"(strings), got {type(self.answers).__name__}; prepare again")
        if len(self.answers) != self.meta.get("num_answers", len(self.answers)):
            raise DataError(f"{self.directory / 'answers.json'}: {len(self.answers)} answers, "
                            f"meta.json says {self.meta['num_answers']}; prepare again")
        self._images: TensorImages | FileImages | None = None

    @property
    def storage(self) -> str:
        """memory or files: where the prepared images are kept."""
        return self.meta["storage"]

    @property
    def images(self) -> TensorImages | FileImages:
        """The image store, opened on first use and shared by every split."""
        if self._images is None:
            self._images = open_store(self.directory, self.storage, self.meta["image_size"])
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
                             pixel_mean=self.meta["pixel_mean"], pixel_std=self.meta["pixel_std"],
                             workers=self.workers)

    def tokenizer(self) -> BertTokenizerFast:
        return load_tokenizer(self.directory / "tokenizer")

    def augmenter(self, config: AugmentConfig | None) -> Augmenter | None:
        """The training augmentation `config` asks for on this data; None when it asks none."""
        if config is None or not config.enabled:
            return None
        sides = (SideSwap.from_vocabulary(self.tokenizer().get_vocab(), self.answers,
                                          str(self.directory)) if config.flip else None)
        return Augmenter(config, sides)

    def annotations(self, split: str) -> dict | None:
        """A VQA split's annotations, row by row (`question_id`, `answers`: every annotator's
        answer, `answer_type` or None), for the official metric; None for other tasks' data."""
        path = self.directory / ANNOTATIONS
        if not path.is_file():
            return None
        by_split = read_json(path)
        if split not in by_split:
            raise DataError(f"{path}: no annotations for split {split!r} "
                            f"(has {', '.join(by_split) or 'none'})")
        return by_split[split]

    def labelled(self, split: str) -> bool:
        """Whether every example of `split` carries its answer (test-dev files do not)."""
        return bool(self.meta["splits"][split].get("labelled", True))

    def references(self, split: str) -> dict[int, list[str]]:
        """A captioning split's reference captions: image row -> captions, raw, in source order."""
        path = self.directory / "references.json"
        if not path.is_file():
            raise DataError(f"{path}: missing; reference captions are prepared for the captioning "
                            f"task only (this is {self.meta.get('task')!r} data)")
        by_split = read_json(path)
        if split not in by_split:
            raise DataError(f"{path}: no reference captions for split {split!r} "
                            f"(has {', '.join(by_split) or 'none'})")
        return {int(row): captions for row, captions in by_split[split].items()}


class PreparedSplit:
    """One split of a prepared directory: its examples, gathered into batches."""

    def __init__(
        self, prepared_dir: str | os.PathLike, split: str,
        images: TensorImages | FileImages | None = None,
        pixel_mean: list[float] | None = None, pixel_std: list[float] | None = None,
        workers: int = 0,
    ) -> None:
        directory = Path(prepared_dir)
        self.name, self.workers = split, workers
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
        tensors = load_tensors(directory / f"{split}.safetensors")
        self.image_index = tensors["image_index"]
        self.input_ids = tensors["input_ids"]
        self.attention_mask = tensors["attention_mask"]
        # Questions and NLVR2 statements have answer targets and ids; captions have neither.
        self.targets = tensors.get("targets")
        self.question_id = tensors.get("question_id")
        # Captions: the images a text cannot tell apart (prepare's `caption_groups`).
        self.image_group = tensors.get("image_group")

    def __len__(self) -> int:
        return self.image_index.shape[0]

    def gather(self, indices: torch.Tensor, augment: Augmenter | None = None,
               seed: Sequence[int] | None = None) -> Batch:
        """The examples at `indices` as one batch, images normalised as prepare recorded.

        `images` is [B, 3, S, S], or [B, 2, 3, S, S] for NLVR2's pairs (image_index [B, 2]).
        With `augment`, the pixels (and, for a flip, the text) are augmented first, every
        draw from a generator seeded by `seed`.
        """
        batch = {
            "pixels": self.images[self.image_index[indices]],
            "input_ids": self.input_ids[indices].long(),
            "attention_mask": self.attention_mask[indices].long(),
            # which image a row shows: captions of one image are each other's positives (ITC)
            # (NLVR2: both images, left then right)
            "image_index": self.image_index[indices],
        }
        if self.targets is not None:
            batch["targets"] = self.targets[indices].float()
            batch["question_id"] = self.question_id[indices]
        if self.image_group is not None:
            batch["image_group"] = self.image_group[indices]
        if augment is not None:
            if seed is None:
                raise ValueError("an augmented batch needs its seed")
            augment(batch, np.random.default_rng(list(seed)))
        batch["images"] = self._normalised(batch.pop("pixels"))
        return batch

    def images_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The normalised images of the given image rows."""
        return self._normalised(self.images[rows])

    def _normalised(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels as float32, normalised as prepare recorded."""
        return pixels.float().mul_(self._scale).sub_(self._shift)

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
        count = self.num_batches(batch_size, world_size, drop_last)
        keys = [(indices[b * batch_size:(b + 1) * batch_size], None) for b in range(count)]
        yield from self.stream(keys)

    def stream(self, keys: Iterable[BatchKey], augment: Augmenter | None = None,
               pin: bool = False) -> Iterator[Batch]:
        """The batches of `keys`, in order, built in this process (0 workers) or in `workers`
        worker processes, two batches ahead each; pinned for a fast copy to a GPU when `pin`."""
        keyed = _KeyedBatches(self, augment)
        if self.workers == 0:
            for key in keys:
                batch = keyed[key]
                yield {k: v.pin_memory() for k, v in batch.items()} if pin else batch
            return
        keys = list(keys)
        if not keys:
            return
        # batch_size=None: the "sampler" yields batch keys and each item is a whole batch.
        # A generator of its own: the loader seeds its workers from it, and from the global
        # one otherwise, a draw that would shift dropout, gate noise and MLM masking by the
        # worker count and on resume.
        loader = DataLoader(keyed, batch_size=None, sampler=keys,
                            num_workers=min(self.workers, len(keys)), pin_memory=pin,
                            prefetch_factor=2, generator=torch.Generator())
        for batch in loader:
            if isinstance(batch, _Failure):  # one line, not the worker's traceback
                raise DataError(batch.message)
            yield batch


class _Failure:
    """An error a worker met, carried back as its message (torch would re-raise it with the
    worker's traceback, many lines)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _KeyedBatches(Dataset):
    """A map-style dataset whose items are whole batches, fetched by `BatchKey`."""

    def __init__(self, split: PreparedSplit, augment: Augmenter | None) -> None:
        self.split, self.augment = split, augment

    def __getitem__(self, key: BatchKey) -> Batch | _Failure:
        indices, seed = key
        try:
            return self.split.gather(indices, self.augment, seed)
        except EvlmError as error:
            if get_worker_info() is None:
                raise
            return _Failure(error.message)
