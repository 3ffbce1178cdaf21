"""Bad input beyond spec errors: each gets one line naming the file, exit status 2, and leaves
what was written before untouched.

Real stages run in this process on a tiny project (easy-VQA, a 4-step teacher); each case
breaks one input (a checkpoint, prepared data, a dataset file) and runs the stage that reads it.
"""

import json
import os
import re
import shutil

import pytest
import yaml
from PIL import Image

from evlm_cli.pipeline.entry import run_stage
from evlm_cli.spec.load import load_spec
from tests.helpers.project import TINY

PREVIOUS = '{"previous": "output"}'
PROGRESS = re.compile(r"\d+%\|")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny project: params, prepared pairs and task data, and a fine-tuned teacher."""
    root = tmp_path_factory.mktemp("bad_input")
    before = os.getcwd()
    os.chdir(root)  # resume folders live under ./.evlm
    try:
        spec = load_spec(TINY)
        (root / "params.yaml").write_text(yaml.safe_dump(spec))
        p = ["--params", "params.yaml"]
        assert run_stage("prepare_pairs", [*p, "--data", "pairs"]) == 0
        assert run_stage("teacher_pretrain", [*p, "--pairs", "pairs", "--model", "pretrained",
                                              "--log", "pretrain.csv"]) == 0
        assert run_stage("prepare", [*p, "--pairs", "pairs", "--data", "data"]) == 0
        assert run_stage("teacher", [*p, "--prepared", "data", "--pretrained", "pretrained",
                                     "--model", "teacher", "--log", "teacher.csv"]) == 0
        yield root, spec
    finally:
        os.chdir(before)


def error_lines(capsys) -> list[str]:
    """stderr without progress bars (tqdm redraws on stderr as it goes)."""
    return [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines()
            if line.strip() and not PROGRESS.search(line)]


def failed(capsys, kind, args, root, names):
    """Run stage `kind`; assert exit 2 and one line on stderr that names `names`."""
    code = run_stage(kind, ["--params", str(root / "params.yaml"), *map(str, args)])
    err = error_lines(capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith(f"error: stage {kind}: "), err
    assert "Traceback" not in err[0]
    for name in names:
        assert str(name) in err[0], err[0]
    return err[0]


def copy_of(root, folder, name):
    target = root / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(root / folder, target)
    return target


def eval_teacher(capsys, root, teacher, prepared, names):
    """teacher_eval of a broken input: its metrics.json, written before, is left as it was."""
    metrics, predictions = root / "metrics.json", root / "predictions.json"
    metrics.write_text(PREVIOUS)
    predictions.write_text(PREVIOUS)
    line = failed(capsys, "teacher_eval", ["--prepared", prepared, "--teacher", teacher,
                                           "--metrics", metrics, "--predictions", predictions],
                  root, names)
    assert metrics.read_text() == PREVIOUS and predictions.read_text() == PREVIOUS
    return line


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_or_truncated_checkpoint_is_named(project, capsys, damage):
    root, _ = project
    teacher = copy_of(root, "teacher", f"teacher_{damage}")
    weights = teacher / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"garbage": b"\x00not safetensors" * 64, "truncated": data[:len(data) // 2],
                         "empty": b""}[damage])
    eval_teacher(capsys, root, teacher, root / "data", [weights])


def test_a_checkpoint_of_the_wrong_shape_is_named(project, capsys):
    root, _ = project
    teacher = copy_of(root, "teacher", "teacher_shape")
    config = json.loads((teacher / "config.json").read_text())
    config["vision"]["encoder"]["ffn"] = [f * 2 for f in config["vision"]["encoder"]["ffn"]]
    (teacher / "config.json").write_text(json.dumps(config))
    eval_teacher(capsys, root, teacher, root / "data", [teacher])


def test_a_checkpoint_without_its_config_is_named(project, capsys):
    root, _ = project
    teacher = copy_of(root, "teacher", "teacher_noconfig")
    (teacher / "config.json").unlink()
    eval_teacher(capsys, root, teacher, root / "data", [teacher / "config.json"])


def test_a_checkpoint_config_that_is_not_json_is_named(project, capsys):
    root, _ = project
    teacher = copy_of(root, "teacher", "teacher_badjson")
    (teacher / "config.json").write_text("{not json")
    eval_teacher(capsys, root, teacher, root / "data", [teacher / "config.json"])


def test_a_missing_checkpoint_folder_is_named(project, capsys):
    root, _ = project
    eval_teacher(capsys, root, root / "no_such_teacher", root / "data", [root / "no_such_teacher"])


# ---------------------------------------------------------------- prepared data


@pytest.mark.parametrize("file, content", [
    ("images.safetensors", b"\x00" * 100),
    ("test.safetensors", b"garbage"),
    ("meta.json", b"{not json"),
    ("answers.json", b'{"not": "a list"}'),
])
def test_corrupt_prepared_data_is_named(project, capsys, file, content):
    root, _ = project
    data = copy_of(root, "data", f"data_{file.replace('.', '_')}")
    (data / file).write_bytes(content)
    eval_teacher(capsys, root, root / "teacher", data, [data / file])


def test_a_missing_prepared_split_is_named(project, capsys):
    root, _ = project
    data = copy_of(root, "data", "data_nosplit")
    (data / "test.safetensors").unlink()
    eval_teacher(capsys, root, root / "teacher", data, [data / "test.safetensors"])


# ---------------------------------------------------------------- datasets (X-VLM JSON)


def xvlm_params(root, spec, name, **data):
    """Params for preparing X-VLM JSON VQA from `root`/images, with `data` overrides."""
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "images").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(folder / "images" / f"{i}.png")
    entries = [{"image": f"{i % 4}.png", "question": "what color is it?", "answer": ["red"],
                "question_id": i} for i in range(8)]
    for split in ("train", "test"):
        (folder / f"{split}.json").write_text(json.dumps(entries))
    (folder / "answers.json").write_text(json.dumps(["red", "blue"]))
    section = {**spec["data"], "source": "xvlm-json", "train": [str(folder / "train.json")],
               "test": [str(folder / "test.json")], "image_root": str(folder / "images"),
               "answer_list": str(folder / "answers.json"), "limit": None, "val_fraction": 0.25,
               **data}
    params = folder / "params.yaml"
    params.write_text(yaml.safe_dump({**spec, "data": section}))
    return folder, params


def prepare_fails(capsys, root, folder, params, names):
    out = folder / "prepared"
    out.mkdir()
    (out / "meta.json").write_text(PREVIOUS)  # an earlier output is not left half-replaced
    code = run_stage("prepare", ["--params", str(params), "--pairs", str(root / "pairs"),
                                 "--data", str(out)])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: stage prepare: "), err
    for name in names:
        assert str(name) in err[0], err[0]
    assert (out / "meta.json").read_text() == PREVIOUS
    return err[0]


def test_the_xvlm_fixture_itself_prepares(project):
    root, spec = project
    folder, params = xvlm_params(root, spec, "good")
    assert run_stage("prepare", ["--params", str(params), "--pairs", str(root / "pairs"),
                                 "--data", str(folder / "prepared")]) == 0


def test_a_missing_image_file_is_named(project, capsys):
    root, spec = project
    folder, params = xvlm_params(root, spec, "missing_image")
    (folder / "images" / "2.png").unlink()
    prepare_fails(capsys, root, folder, params, ["2.png"])


def test_an_unreadable_png_is_named(project, capsys):
    root, spec = project
    folder, params = xvlm_params(root, spec, "bad_png")
    (folder / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n but not an image")
    prepare_fails(capsys, root, folder, params, ["1.png"])


def test_an_empty_dataset_is_named(project, capsys):
    root, spec = project
    folder, params = xvlm_params(root, spec, "empty")
    (folder / "train.json").write_text("[]")
    prepare_fails(capsys, root, folder, params, [folder / "train.json"])


def test_a_dataset_json_with_wrong_types_is_named(project, capsys):
    root, spec = project
    folder, params = xvlm_params(root, spec, "wrong_types")
    entries = json.loads((folder / "train.json").read_text())
    entries[3]["question"] = 42
    (folder / "train.json").write_text(json.dumps(entries))
    prepare_fails(capsys, root, folder, params, [folder / "train.json"])


def test_a_dataset_file_that_is_not_json_is_named(project, capsys):
    root, spec = project
    folder, params = xvlm_params(root, spec, "not_json")
    (folder / "test.json").write_text("[{")
    prepare_fails(capsys, root, folder, params, [folder / "test.json"])


@pytest.mark.parametrize("answers, why", [
    ('{"red": 1}', "expected a JSON list of strings"),
    ('["blue", "green"]', "none of the train questions' answers is in it"),
])
def test_an_answer_list_that_does_not_fit_is_named_with_why(project, capsys, answers, why):
    root, spec = project
    folder, params = xvlm_params(root, spec, f"answers_{why.split()[0]}")
    (folder / "answers.json").write_text(answers)
    line = prepare_fails(capsys, root, folder, params, [folder / "answers.json"])
    assert why in line


def test_a_missing_tokenizer_is_named(project, capsys):
    root, spec = project
    folder, params = xvlm_params(root, spec, "no_tokenizer")
    pairs = copy_of(root, "pairs", "pairs_no_tokenizer")
    shutil.rmtree(pairs / "tokenizer")
    out = folder / "prepared"
    code = run_stage("prepare", ["--params", str(params), "--pairs", str(pairs), "--data", str(out)])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and str(pairs / "tokenizer") in err[0], err


def test_a_params_file_that_is_not_a_mapping_is_named(project, capsys):
    root, _ = project
    bad = root / "bad_params.yaml"
    bad.write_text("- a list, not a mapping\n")
    code = run_stage("teacher_eval", ["--params", str(bad), "--prepared", "data", "--teacher",
                                      "teacher", "--metrics", str(root / "m.json"),
                                      "--predictions", str(root / "p.json")])
    err = error_lines(capsys)
    assert code == 2 and len(err) == 1 and str(bad) in err[0], err
