"""Training-time image augmentation as X-VLM fine-tunes: random resized crop, horizontal flip
and RandAugment, on the uint8 pixels of a batch before they are normalised.

Every random choice comes from a generator the caller seeds per batch (seed, epoch, rank,
batch), never from a global one. So a batch is the same whichever worker builds it and however
many workers there are, and a resumed run sees the batches the uninterrupted one saw; the
training loop's own random state (dropout, gate noise) is untouched.

A flip mirrors the scene, so the text's "left" and "right" are swapped with it (X-VLM does so
for NLVR2), and so are the answers that name a side ("top left" scores as "top right"); an
example whose answer names a side that has no mirror in the answer list is not flipped. An example
about two images (NLVR2) is mirrored whole: each image mirrored, and the pair's order swapped,
so "the left image" still names the image on the left. The swap works on token ids, so it
needs "left" and "right" to be whole words of the vocabulary (`SideSwap.from_vocabulary`):
"leftmost" is "left ##most" to WordPiece and becomes "rightmost".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from evlm_cli.core.config import AugmentConfig
from evlm_cli.core.errors import DataError

# Geometric RandAugment ops fill what they uncover with mid grey (ALBEF's fill).
FILL = 128
# RandAugment's ops, as ALBEF and X-VLM use it: no op that changes hue (Color, Solarize,
# Posterize, Invert), since questions name colours. `MAX_LEVEL` is the magnitude of the
# strongest setting of each op.
MAX_LEVEL = 10.0
SIDE_WORDS = ("left", "right")


OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
       "translate_x", "translate_y", "rotate")


def apply_op(name: str, image: torch.Tensor, level: float, sign: float) -> torch.Tensor:
    """One RandAugment op on a uint8 [3, S, S] image at `level` in [0, 1], `sign` +-1.

    A module function, not a table of closures, so that an `Augmenter` pickles into worker
    processes started by spawn (macOS, Windows) as well as by fork.
    """
    from torchvision.transforms.v2 import functional as F  # slow to import: only when used

    if name == "identity":
        return image
    if name == "autocontrast":
        return F.autocontrast(image)
    if name == "equalize":
        return F.equalize(image)
    if name in ("brightness", "sharpness"):
        adjust = F.adjust_brightness if name == "brightness" else F.adjust_sharpness
        return adjust(image, 1.0 + sign * 0.9 * level)
    angle, translate, shear = 0.0, [0, 0], [0.0, 0.0]
    if name == "rotate":
        angle = sign * 30.0 * level
    elif name.startswith("shear"):  # up to 0.3 of a side per side, as an angle
        shear[name == "shear_y"] = sign * math.degrees(math.atan(0.3 * level))
    elif name.startswith("translate"):  # up to 0.3 of the side
        translate[name == "translate_y"] = int(round(sign * 0.3 * level * image.shape[-1]))
    else:
        raise ValueError(f"unknown RandAugment op {name!r} (expected one of: {', '.join(OPS)})")
    return F.affine(image, angle=angle, translate=translate, scale=1.0, shear=shear, fill=FILL)


def mirrored(text: str) -> str:
    """`text` with the words "left" and "right" swapped ("top left" -> "top right")."""
    swap = {"left": "right", "right": "left"}
    return " ".join(swap.get(word, word) for word in text.split(" "))


@dataclass(frozen=True)
class SideSwap:
    """What a flip changes besides the pixels: the token ids of "left" and "right", and the
    answers' mirror images ("left" <-> "right", "top left" <-> "top right") as a permutation
    of the answer columns. `blocked` answers name a side whose mirror is not an answer (a
    VQAv2 list may have "left hand" but not "right hand"): an example scoring one is not
    flipped, rather than mislabelled."""

    tokens: tuple[int, int]
    answers: tuple[int, ...] | None  # column j of a flipped example reads column answers[j]
    blocked: tuple[int, ...] = ()

    @classmethod
    def from_vocabulary(cls, vocab: Mapping[str, int], answers: list[str], where: str
                        ) -> SideSwap:
        missing = [w for w in SIDE_WORDS if w not in vocab]
        if missing:
            raise DataError(f"augment.flip: the tokenizer of {where} has no whole-word token "
                            f"{missing[0]!r}, so a flip cannot swap left and right in the text; "
                            "turn flip off")
        column = {answer: index for index, answer in enumerate(answers)}
        permutation, blocked = list(range(len(answers))), []
        for index, answer in enumerate(answers):
            mirror = mirrored(answer)
            if mirror == answer:
                continue
            if mirror in column:
                permutation[index] = column[mirror]
            else:
                blocked.append(index)
        moved = permutation != list(range(len(answers)))
        return cls(tokens=(vocab["left"], vocab["right"]),
                   answers=tuple(permutation) if moved else None, blocked=tuple(blocked))

    def can_flip(self, targets: torch.Tensor | None) -> bool:
        """Whether an example with these answer scores may be flipped."""
        return not (self.blocked and targets is not None
                    and bool((targets[list(self.blocked)] > 0).any()))

    def apply(self, batch: dict[str, torch.Tensor], flipped: torch.Tensor) -> None:
        """Swap left and right in the flipped rows' text and answer scores, in place."""
        ids = batch["input_ids"]
        left, right = self.tokens
        rows = flipped[:, None]
        batch["input_ids"] = torch.where(rows & (ids == left), right,
                                         torch.where(rows & (ids == right), left, ids))
        if self.answers is not None and "targets" in batch:
            batch["targets"] = torch.where(rows, batch["targets"][:, list(self.answers)],
                                           batch["targets"])


class Augmenter:
    """Applies `AugmentConfig` to the raw uint8 batch a prepared split gathers."""

    def __init__(self, config: AugmentConfig, sides: SideSwap | None) -> None:
        if config.flip and sides is None:
            raise ValueError("a flip needs the side swap of the data's vocabulary")
        self.config, self.sides = config, sides

    def __call__(self, batch: dict[str, torch.Tensor], rng: np.random.Generator) -> None:
        """Augment `batch["pixels"]` ([B, 3, S, S], or [B, 2, 3, S, S]) in place of it."""
        pixels = batch["pixels"]
        pairs = pixels.ndim == 5
        out = pixels.clone()
        flipped = torch.zeros(pixels.shape[0], dtype=torch.bool)
        targets = batch.get("targets")
        # Rows of one image flip together: captions of an image are each other's positives
        # in ITC, which a mirrored image with unmirrored text would contradict.
        by_image: dict[tuple[int, ...], bool] = {}
        for i in range(pixels.shape[0]):
            images = out[i] if pairs else out[i:i + 1]
            for j in range(images.shape[0]):
                images[j] = self._one(images[j], rng)
            if not self.config.flip:
                continue
            wanted = rng.random() < 0.5  # drawn for every row: the stream never depends on data
            wanted = by_image.setdefault(tuple(batch["image_index"][i].reshape(-1).tolist()),
                                         wanted)
            if wanted and self.sides.can_flip(None if targets is None else targets[i]):
                flipped[i] = True
                mirror = images.flip(-1)
                images.copy_(mirror.flip(0) if pairs else mirror)  # the pair swaps sides
        batch["pixels"] = out
        if flipped.any():
            self.sides.apply(batch, flipped)
            if pairs:
                batch["image_index"] = torch.where(flipped[:, None],
                                                   batch["image_index"].flip(1),
                                                   batch["image_index"])

    def _one(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        size = image.shape[-1]
        if self.config.crop_scale is not None:
            from torchvision.transforms.v2.functional import resized_crop

            top, left, height, width = crop_box(size, self.config.crop_scale, rng)
            image = resized_crop(image, top, left, height, width, [size, size], antialias=True)
        ra = self.config.randaugment
        if ra is not None:
            level = min(ra.magnitude, MAX_LEVEL) / MAX_LEVEL
            for name in rng.choice(OPS, size=ra.ops, replace=True):
                if rng.random() < 0.5:  # each drawn op applies half the time (ALBEF)
                    sign = 1.0 if rng.random() < 0.5 else -1.0
                    image = apply_op(str(name), image, level, sign)
        return image


def crop_box(size: int, scale: tuple[float, ...], rng: np.random.Generator,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of a square image: a share of its area drawn
    from `scale`, an aspect ratio log-uniform in `ratio` (torchvision's RandomResizedCrop);
    after 10 draws that do not fit, the whole image."""
    area = size * size
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        width = int(round(math.sqrt(target * aspect)))
        height = int(round(math.sqrt(target / aspect)))
        if 0 < width <= size and 0 < height <= size:
            top = int(rng.integers(0, size - height + 1))
            left = int(rng.integers(0, size - width + 1))
            return top, left, height, width
    return 0, 0, size, size
