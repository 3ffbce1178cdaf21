"""The mosaic VQA benchmark: questions answered right, mosaics rendered right, splits apart."""

from collections import Counter

import easy_vqa
import numpy as np
import pytest
from PIL import Image

from evlm_cli.data.captions import ShapeFacts, easy_vqa_facts, measure_shape
from evlm_cli.data.easy_vqa import read_easy_vqa
from evlm_cli.data.mosaic import (
    ANSWERS,
    KINDS,
    TILES,
    mosaic_questions,
    question,
    render_mosaic,
)

RED_CIRCLE = ShapeFacts("circle", "red", "small", "center")
RED_SQUARE = ShapeFacts("rectangle", "red", "large", "top left")
BLUE_CIRCLE = ShapeFacts("circle", "blue", "medium", "left")
GRAY_TRIANGLE = ShapeFacts("triangle", "gray", "small", "bottom")


def ask(kind, tiles, seed=0):
    return question(kind, tiles, np.random.default_rng(seed))


def test_questions_are_answered_from_the_tiles_they_name():
    tiles = (RED_CIRCLE, RED_SQUARE, BLUE_CIRCLE, GRAY_TRIANGLE)
    seen = set()
    for seed in range(200):
        for kind in KINDS:
            text, answer = ask(kind, tiles, seed)
            seen.add(text)
            assert answer in ANSWERS
            expected = {
                "what color is the shape in the top left?": "red",
                "what color is the shape in the bottom left?": "blue",
                "what shape is in the top right?": "rectangle",
                "what shape is in the bottom right?": "triangle",
                "how many circles are there?": "2",
                "how many triangles are there?": "1",
                "how many red shapes are there?": "2",
                "how many yellow shapes are there?": "0",
                "are the top two shapes the same color?": "yes",
                "are the top two shapes the same shape?": "no",
                "are the left two shapes the same shape?": "yes",
                "are the left two shapes the same color?": "no",
                "are the right two shapes the same color?": "no",
                "are the bottom two shapes the same shape?": "no",
            }.get(text)
            assert expected is None or answer == expected, (text, answer)
    # every tile, side and count question was asked at least once over the draws
    assert {f"what shape is in the {tile}?" for tile in TILES} <= seen
    assert "are the right two shapes the same shape?" in seen


def test_a_comparison_asks_for_the_other_answer_when_no_neighbours_agree():
    tiles = (RED_CIRCLE, ShapeFacts("rectangle", "blue", "small", "top"),
             ShapeFacts("triangle", "gray", "small", "top"), ShapeFacts("circle", "yellow", "large",
                                                                       "top"))
    # no two neighbours share a colour; the top-left and bottom-right circles are diagonal
    answers = Counter(ask("same", tiles, seed)[1] for seed in range(50))
    assert answers == {"no": 50}
    alike = (RED_CIRCLE,) * 4
    assert Counter(ask("same", alike, seed)[1] for seed in range(50)) == {"yes": 50}
    mixed = Counter(ask("same", (RED_CIRCLE, RED_SQUARE, BLUE_CIRCLE, GRAY_TRIANGLE), seed)[1]
                    for seed in range(400))
    assert 160 < mixed["yes"] < 240  # drawn evenly when both answers are possible


def test_a_rendered_mosaic_holds_each_image_in_its_tile(tmp_path):
    paths = [easy_vqa.get_test_image_paths()[i] for i in (3, 1, 4, 1)]
    render_mosaic(paths, tmp_path / "m.png")
    mosaic = np.asarray(Image.open(tmp_path / "m.png").convert("RGB"))
    assert mosaic.shape == (128, 128, 3)
    for index, path in enumerate(paths):
        row, column = divmod(index, 2)
        tile = mosaic[64 * row:64 * (row + 1), 64 * column:64 * (column + 1)]
        assert np.array_equal(tile, np.asarray(Image.open(path).convert("RGB")))
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="one size"):
        render_mosaic([*paths[:3], str(tmp_path / "small.png")], tmp_path / "bad.png")


def test_mosaic_questions_agree_with_the_pixels_of_the_rendered_mosaics(tmp_path):
    records = read_easy_vqa(0.1, 0)["test"]
    few = {r["image"] for r in records[:60]}
    facts = easy_vqa_facts([r for r in records if r["image"] in few])
    questions = mosaic_questions(facts, seed=0, stream=2, out_dir=tmp_path, per_image=1,
                                 questions_per_mosaic=3)
    images = sorted({q["image"] for q in questions})
    assert len(images) == len(facts) and len(questions) == 3 * len(facts)
    measured = {}
    for path in images:  # the tiles' facts measured afresh from the mosaic's own pixels
        pixels = np.asarray(Image.open(path).convert("RGB"))
        measured[path] = tuple(measure_shape(pixels[64 * (i // 2):64 * (i // 2 + 1),
                                                    64 * (i % 2):64 * (i % 2 + 1)])
                               for i in range(4))
    for record in questions:
        tiles = measured[record["image"]]
        text, (answer,) = record["question"], record["answers"]
        words = text.rstrip("?").split()
        if text.startswith("how many"):
            thing = words[2]
            count = sum(t.color == thing or t.shape + "s" == thing for t in tiles)
            assert answer == str(count), text
        elif text.startswith("what"):
            tile = tiles[TILES.index(" ".join(words[-2:]))]
            assert answer == (tile.color if words[1] == "color" else tile.shape), text
        else:
            a, b = {"top": (0, 1), "bottom": (2, 3), "left": (0, 2), "right": (1, 3)}[words[2]]
            fact = words[-1]
            assert answer == ("yes" if getattr(tiles[a], fact) == getattr(tiles[b], fact)
                              else "no"), text
        # no question of a mosaic is asked twice
    per_image = Counter((q["image"], q["question"]) for q in questions)
    assert max(per_image.values()) == 1
    again = mosaic_questions(facts, seed=0, stream=2, out_dir=tmp_path / "again", per_image=1)
    assert [q["question"] for q in again] == [q["question"] for q in questions]
    with pytest.raises(ValueError, match="needs 4 images"):
        mosaic_questions(dict(list(facts.items())[:3]), 0, 0, tmp_path / "few")
