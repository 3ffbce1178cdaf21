"""Training augmentation and the streaming loader: determinism per batch seed, the same batches
with any number of workers and after a resume, the flip's left/right swap (text, answers, NLVR2
pairs), and the refusals."""

import numpy as np
import pytest
import torch

from evlm_cli.core.config import AugmentConfig, DataConfig, RandAugmentConfig, build
from evlm_cli.core.errors import DataError
from evlm_cli.data.augment import Augmenter, SideSwap, crop_box
from evlm_cli.data.loader import PreparedData, resolve_workers
from evlm_cli.data.prepare import prepare
from evlm_cli.training.loop import EpochBatches

SIZE = 16
ALL = AugmentConfig(crop_scale=(0.5, 1.0), flip=True,
                    randaugment=RandAugmentConfig(ops=2, magnitude=7))
LEFT, RIGHT, OTHER = 7, 9, 3
SIDES = SideSwap(tokens=(LEFT, RIGHT), answers=None)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, easy_vqa_tokenizer):
    out = tmp_path_factory.mktemp("prepared")
    data = {"source": "easy-vqa", "train": None, "val": None, "test": None, "image_root": None,
            "answer_list": None, "image_size": SIZE, "max_text_len": 12, "limit": 96,
            "val_fraction": 0.1, "storage": "files", "skip_bad_images": False,
            "caption_prompt": "", "vqa_loss": "bce"}
    prepare(build(DataConfig, data), "vqa", 0, out, easy_vqa_tokenizer)
    return out


def raw_batch(pixels: torch.Tensor, ids: list[list[int]], targets=None) -> dict:
    batch = {"pixels": pixels, "input_ids": torch.tensor(ids),
             "image_index": torch.arange(pixels.shape[0] * (2 if pixels.ndim == 5 else 1))
             .reshape(pixels.shape[0], -1).squeeze(-1)}
    if targets is not None:
        batch["targets"] = targets
    return batch


def test_crop_box_fits_and_follows_its_generator():
    for seed in range(50):
        top, left, h, w = crop_box(SIZE, (0.3, 1.0), np.random.default_rng(seed))
        assert 0 <= top and 0 <= left and top + h <= SIZE and left + w <= SIZE
        assert 0.3 * SIZE * SIZE * 0.7 <= h * w <= SIZE * SIZE  # rounding aside, in range
    assert crop_box(SIZE, (0.3, 1.0), np.random.default_rng(4)) == crop_box(
        SIZE, (0.3, 1.0), np.random.default_rng(4))


def test_same_seed_same_batch_and_another_seed_another(prepared):
    split = PreparedData(prepared).split("train")
    augment = Augmenter(ALL, SIDES)
    indices = torch.arange(8)
    a = split.gather(indices, augment, (0, 0, 0, 1))
    b = split.gather(indices, augment, (0, 0, 0, 1))
    c = split.gather(indices, augment, (0, 0, 0, 2))
    plain = split.gather(indices)
    assert torch.equal(a["images"], b["images"])
    assert not torch.equal(a["images"], c["images"])
    assert not torch.equal(a["images"], plain["images"])
    assert a["images"].shape == plain["images"].shape and a["images"].dtype == torch.float32
    assert torch.equal(a["question_id"], plain["question_id"])  # the same examples


def test_flip_mirrors_the_image_and_swaps_left_and_right_in_the_text():
    # the left half red, the right half blue; the text asks about the left
    pixels = torch.zeros(16, 3, SIZE, SIZE, dtype=torch.uint8)
    pixels[:, 0, :, :SIZE // 2] = 255
    pixels[:, 2, :, SIZE // 2:] = 255
    batch = raw_batch(pixels, [[OTHER, LEFT, OTHER, RIGHT]] * 16)
    Augmenter(AugmentConfig(None, True, None), SIDES)(batch, np.random.default_rng(0))
    flipped = batch["pixels"][:, 2, 0, 0] == 255  # blue now on the left
    assert 0 < int(flipped.sum()) < 16  # about half
    for row in range(16):
        ids = batch["input_ids"][row].tolist()
        # the word that named the red half still names the red half
        assert ids == ([OTHER, RIGHT, OTHER, LEFT] if flipped[row] else [OTHER, LEFT, OTHER, RIGHT])
        red_on_left = batch["pixels"][row, 0, 0, 0] == 255
        assert bool(red_on_left) != bool(flipped[row])


def test_flip_swaps_answers_that_name_a_side_and_spares_those_without_a_mirror():
    answers = ["yes", "left", "right", "top left", "top right", "left hand", "no"]
    sides = SideSwap.from_vocabulary({"left": LEFT, "right": RIGHT}, answers, "x")
    assert sides.answers == (0, 2, 1, 4, 3, 5, 6) and sides.blocked == (5,)
    targets = torch.tensor([[0.0, 1.0, 0.5, 0.0, 0.25, 0.0, 0.0]] * 2)
    batch = {"input_ids": torch.tensor([[LEFT], [LEFT]]), "targets": targets.clone()}
    sides.apply(batch, torch.tensor([True, False]))
    assert batch["targets"].tolist()[0] == [0.0, 0.5, 1.0, 0.25, 0.0, 0.0, 0.0]
    assert batch["targets"].tolist()[1] == targets[1].tolist()
    assert batch["input_ids"].tolist() == [[RIGHT], [LEFT]]
    # "left hand" has no "right hand": an example scoring it keeps its image unflipped
    assert sides.can_flip(targets[0]) and not sides.can_flip(torch.eye(7)[5])
    pixels = torch.zeros(32, 3, SIZE, SIZE, dtype=torch.uint8)
    pixels[..., :4] = 255
    blocked = raw_batch(pixels, [[LEFT]] * 32, torch.eye(7)[5].repeat(32, 1))
    Augmenter(AugmentConfig(None, True, None), sides)(blocked, np.random.default_rng(0))
    assert torch.equal(blocked["pixels"], pixels) and (blocked["input_ids"] == LEFT).all()


def test_rows_of_one_image_flip_together():
    """Captions of one image are ITC positives: they flip (or not) as one."""
    pixels = torch.zeros(40, 3, SIZE, SIZE, dtype=torch.uint8)
    pixels[..., :4] = 255
    batch = raw_batch(pixels, [[LEFT]] * 40)
    batch["image_index"] = torch.arange(40) // 4  # four captions per image
    Augmenter(AugmentConfig(None, True, None), SIDES)(batch, np.random.default_rng(3))
    flipped = (batch["input_ids"][:, 0] == RIGHT).reshape(10, 4)
    assert (flipped == flipped[:, :1]).all() and 0 < int(flipped[:, 0].sum()) < 10
    mirrored = (batch["pixels"][:, 0, 0, -1] == 255).reshape(10, 4)
    assert torch.equal(mirrored, flipped)


def test_flip_of_an_nlvr2_pair_mirrors_both_and_swaps_them():
    pixels = torch.zeros(16, 2, 3, SIZE, SIZE, dtype=torch.uint8)
    pixels[:, 0, 0, :, :4] = 255  # the left image: a red stripe at its left edge
    pixels[:, 1, 1, :, :4] = 255  # the right image: a green stripe at its left edge
    batch = raw_batch(pixels, [[LEFT]] * 16)
    Augmenter(AugmentConfig(None, True, None), SIDES)(batch, np.random.default_rng(1))
    flipped = batch["input_ids"][:, 0] == RIGHT
    assert 0 < int(flipped.sum()) < 16
    out = batch["pixels"]
    for row in range(16):
        if flipped[row]:  # the green image is now the left one, its stripe at its right edge
            assert out[row, 0, 1, 0, -1] == 255 and out[row, 1, 0, 0, -1] == 255
            assert batch["image_index"][row].tolist() == [2 * row + 1, 2 * row]
        else:
            assert torch.equal(out[row], pixels[row])
            assert batch["image_index"][row].tolist() == [2 * row, 2 * row + 1]


def test_flip_is_refused_when_left_and_right_cannot_be_swapped(prepared):
    # easy-VQA's questions never say left or right: its vocabulary has no such token
    with pytest.raises(DataError, match=r"augment\.flip: the tokenizer of .* has no whole-word "
                                        r"token 'left'"):
        PreparedData(prepared).augmenter(ALL)
    assert PreparedData(prepared).augmenter(AugmentConfig((0.5, 1.0), False, None)) is not None
    assert PreparedData(prepared).augmenter(AugmentConfig(None, False, None)) is None


def test_workers_and_resume_give_the_same_batches(prepared):
    """0 or 2 workers, from the start or resumed at batch 3: the same augmented batches."""
    data = PreparedData(prepared)
    split = data.split("train")
    augment = Augmenter(AugmentConfig((0.5, 1.0), False, RandAugmentConfig(2, 9)), None)

    def epoch(workers, start=0):
        split.workers = workers
        batches = EpochBatches(split, 16, seed=5, augment=augment, answer_balance=0.5)
        return list(batches(1, start))

    alone, two = epoch(0), epoch(2)
    assert len(alone) == len(two) == len(split) // 16
    for a, b in zip(alone, two, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed = epoch(2, start=3)
    for a, b in zip(alone[3:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    split.workers = 0
    assert not torch.equal(epoch(0)[0]["images"],
                           list(EpochBatches(split, 16, seed=6, augment=augment,
                                             answer_balance=0.5)(1))[0]["images"])


def test_workers_leave_the_global_random_state_alone(prepared):
    """Dropout, gate noise and MLM masking draw from the global generator: the loader must
    not, or the worker count and a resume would shift them."""
    split = PreparedData(prepared).split("train")
    split.workers = 2
    augment = Augmenter(AugmentConfig((0.5, 1.0), False, None), None)
    torch.manual_seed(11)
    before = torch.get_rng_state()
    batches = list(EpochBatches(split, 16, seed=5, augment=augment)(0))
    assert batches and torch.equal(torch.get_rng_state(), before)


def test_an_error_in_a_worker_is_one_line(prepared, tmp_path):
    import json
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(prepared, copy)
    listed = json.loads((copy / "images.json").read_text())
    listed[0] = str(tmp_path / "gone.png")
    (copy / "images.json").write_text(json.dumps(listed))
    split = PreparedData(copy).split("train")
    split.workers = 2
    with pytest.raises(DataError) as error:
        list(split.batches(len(split)))
    assert "\n" not in error.value.message and "gone.png" in error.value.message
    assert "Traceback" not in str(error.value)


def test_evaluation_batches_are_never_augmented_and_workers_keep_their_order(prepared):
    split = PreparedData(prepared).split("val")
    alone = list(split.batches(5))
    split.workers = 2
    two = list(split.batches(5))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(alone, two, strict=True) for k in a)
    assert torch.equal(torch.cat([b["question_id"] for b in two]), split.question_id)


def test_auto_workers():
    assert resolve_workers(3, True, False) == 3
    assert resolve_workers(None, True, False) == 0  # in memory, nothing to augment
    assert 1 <= resolve_workers(None, False, False) <= 4
    assert 1 <= resolve_workers(None, True, True, processes=64) <= 4


def test_every_randaugment_op_keeps_shape_and_dtype_and_the_augmenter_pickles():
    import pickle

    from evlm_cli.data.augment import OPS, apply_op

    image = torch.randint(0, 256, (3, SIZE, SIZE), dtype=torch.uint8)
    for name in OPS:
        for sign in (-1.0, 1.0):
            out = apply_op(name, image, 0.7, sign)
            assert out.shape == image.shape and out.dtype == torch.uint8, name
    assert torch.equal(apply_op("identity", image, 1.0, 1.0), image)
    assert not torch.equal(apply_op("rotate", image, 1.0, 1.0), image)
    with pytest.raises(ValueError, match="unknown RandAugment op 'invert'"):
        apply_op("invert", image, 1.0, 1.0)
    # workers started by spawn (macOS, Windows) receive the augmenter pickled
    augment = pickle.loads(pickle.dumps(Augmenter(ALL, SIDES)))
    batch = raw_batch(image[None].repeat(4, 1, 1, 1), [[LEFT]] * 4)
    augment(batch, np.random.default_rng(0))
    assert batch["pixels"].shape == (4, 3, SIZE, SIZE)
