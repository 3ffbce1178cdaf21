"""A VQA benchmark on 2x2 mosaics of easy-VQA images, on which compression costs accuracy.

easy-VQA saturates: its teacher and a student with 90% of its prunable weights removed score
the same (docs/results/sweep.md), so it cannot tell a good pruning from a bad one. A mosaic places four easy-VQA
images (four tiles) in a 2x2 grid, and its questions need the whole image and some reasoning:

    what color is the shape in the {tile}?              a colour   (where, then what)
    what shape is in the {tile}?                        a shape
    how many {shape}s are there?                        0 to 4     (counting over tiles)
    how many {color} shapes are there?                  0 to 4
    are the {side} two shapes the same {color|shape}?   yes or no  (comparing two tiles)

where a {tile} is "top left", "top right", "bottom left" or "bottom right" and a {side} "top",
"bottom", "left" or "right". Each tile's shape and colour are `captions.easy_vqa_facts`'s
(easy-VQA's answers, checked against the pixels). The words are the captions' words (which the
tokenizer every task uses is trained on) but for how, many, are, two, same and the digits.

This is derived demo data (docs/easy_vqa_demo.md). A split's mosaics use only that split's images
(train and val split easy-VQA's train images as every easy-VQA task does for the same seed;
test uses its test images). The mosaics are rendered as PNG files at twice easy-VQA's side, so
prepare decodes and resizes them as it does any image file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from evlm_cli.data.captions import COLORS, SHAPES, ShapeFacts, easy_vqa_facts
from evlm_cli.data.easy_vqa import read_easy_vqa
from evlm_cli.data.records import VqaRecord

SPLITS = ("train", "val", "test")
TILES = ("top left", "top right", "bottom left", "bottom right")  # row-major in the grid
# The two tiles each side names, top or left one first.
SIDES = {"top": (0, 1), "bottom": (2, 3), "left": (0, 2), "right": (1, 3)}
COMPARED = ("color", "shape")
COUNTS = ("0", "1", "2", "3", "4")
ANSWERS = (*COLORS, *SHAPES, *COUNTS, "yes", "no")
KINDS = ("color at", "shape at", "count shape", "count color", "same")
# Each split has this many mosaics per image it holds, and each mosaic this many questions of
# different kinds: 3,600 train, 400 val and 1,000 test images give 7,200, 800 and 2,000
# mosaics and 21,600, 2,400 and 6,000 questions.
MOSAICS_PER_IMAGE = 2
QUESTIONS_PER_MOSAIC = 3


def question(kind: str, tiles: tuple[ShapeFacts, ...], rng: np.random.Generator
             ) -> tuple[str, str]:
    """A (question, answer) of `kind` about a mosaic showing `tiles` (in TILES order).

    A comparison first draws its answer, yes or no, evenly, then a side and a fact for which
    that is the answer; when the mosaic has none (no two neighbours agree), it asks with the
    other answer.
    """
    if kind == "color at":
        tile = int(rng.integers(4))
        return f"what color is the shape in the {TILES[tile]}?", tiles[tile].color
    if kind == "shape at":
        tile = int(rng.integers(4))
        return f"what shape is in the {TILES[tile]}?", tiles[tile].shape
    if kind == "count shape":
        shape = SHAPES[rng.integers(len(SHAPES))]
        return f"how many {shape}s are there?", str(sum(t.shape == shape for t in tiles))
    if kind == "count color":
        names = tuple(COLORS)
        color = names[rng.integers(len(names))]
        return f"how many {color} shapes are there?", str(sum(t.color == color for t in tiles))
    if kind != "same":
        raise ValueError(f"unknown question kind {kind!r} (expected one of: {', '.join(KINDS)})")
    wanted = bool(rng.integers(2))
    options = {answer: [(side, fact) for side, (a, b) in SIDES.items() for fact in COMPARED
                        if (getattr(tiles[a], fact) == getattr(tiles[b], fact)) == answer]
               for answer in (True, False)}
    if not options[wanted]:
        wanted = not wanted
    side, fact = options[wanted][rng.integers(len(options[wanted]))]
    return f"are the {side} two shapes the same {fact}?", "yes" if wanted else "no"


def render_mosaic(paths: list[str], out: Path) -> None:
    """Write the 2x2 mosaic of the images at `paths` (TILES order) to `out` as PNG, each tile
    at its image's own size (easy-VQA's are 64x64)."""
    tiles = []
    for path in paths:
        with Image.open(path) as image:
            tiles.append(image.convert("RGB"))
    side = tiles[0].width
    if any(tile.size != (side, side) for tile in tiles):
        raise ValueError(f"mosaic tiles must be square and of one size: {[t.size for t in tiles]}")
    mosaic = Image.new("RGB", (2 * side, 2 * side))
    for index, tile in enumerate(tiles):
        mosaic.paste(tile, (side * (index % 2), side * (index // 2)))
    out.parent.mkdir(parents=True, exist_ok=True)
    mosaic.save(out, format="PNG")


def mosaic_questions(facts: dict[str, ShapeFacts], seed: int, stream: int, out_dir: Path,
                     per_image: int = MOSAICS_PER_IMAGE,
                     questions_per_mosaic: int = QUESTIONS_PER_MOSAIC) -> list[VqaRecord]:
    """Render `per_image` x len(facts) mosaics of the images of `facts` into `out_dir` and
    return their questions (see the module docstring).

    A mosaic's four tiles are four different images drawn at random, and its questions are of
    different kinds. The draws are seeded by (seed, stream), so each split gets its own.
    """
    images = sorted(facts)  # the draws must not depend on the readers' order
    if len(images) < len(TILES):
        raise ValueError(f"a mosaic needs {len(TILES)} images, the split has {len(images)}")
    if not 1 <= questions_per_mosaic <= len(KINDS):
        raise ValueError(f"questions_per_mosaic must be 1 to {len(KINDS)}")
    rng = np.random.default_rng([seed, stream])
    records = []
    for index in tqdm(range(per_image * len(images)), desc="render mosaics", unit="img"):
        chosen = [images[i] for i in rng.choice(len(images), size=len(TILES), replace=False)]
        path = out_dir / f"{index:06d}.png"
        render_mosaic(chosen, path)
        tiles = tuple(facts[image] for image in chosen)
        for kind_index in rng.choice(len(KINDS), size=questions_per_mosaic, replace=False):
            text, answer = question(KINDS[kind_index], tiles, rng)
            records.append(VqaRecord(image=str(path), question=text, answers=[answer],
                                     question_id=len(records)))
    return records


def read_easy_vqa_mosaic(val_fraction: float, seed: int, out_dir: Path
                         ) -> dict[str, list[VqaRecord]]:
    """The mosaic VQA task: `train`, `val` and `test` questions, their mosaics rendered under
    `out_dir` (one folder per split), which must outlive the records' use."""
    vqa = read_easy_vqa(val_fraction, seed)
    return {split: mosaic_questions(easy_vqa_facts(vqa[split]), seed, stream,
                                    Path(out_dir) / split)
            for stream, split in enumerate(SPLITS)}
