"""End to end: a VQA spec on X-VLM JSON files whose test file has no answers (test-dev) is
predicted, not scored: predictions.json holds one row per question, and nothing reads 0."""

import json
import shutil

import pytest
import yaml
from PIL import Image

from evlm_cli.core.results import EvaluateResults, TeacherResults
from tests.helpers.pipeline import EVLM, REPO, sh

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def xvlm_vqa_project(folder):
    """Images of one colour each, X-VLM VQA files (ten annotators a question), a test file
    without answers, and the tiny spec reading them."""
    images = folder / "images"
    images.mkdir(parents=True)
    entries = []
    for index in range(48):
        color = list(COLORS)[index % 3]
        Image.new("RGB", (32, 32), COLORS[color]).save(images / f"{index}.png")
        entries.append({"image": f"{index}.png", "question": "what color is it?",
                        "question_id": 1000 + index,
                        "answer": [color] * 8 + ["purple", "Two"]})
    files = {"train": entries[:40], "val": entries[40:44],
             "test": [{k: v for k, v in e.items() if k != "answer"} for e in entries[44:]]}
    for split, rows in files.items():
        (folder / f"{split}.json").write_text(json.dumps(rows))
    (folder / "answers.json").write_text(json.dumps([*COLORS, "yes", "no"]))
    spec = yaml.safe_load((REPO / "tests/specs/tiny_vqa.yaml").read_text())
    spec["name"] = "xvlm_testdev"
    spec["data"] = {**spec["data"], "source": "xvlm-json", "train": ["train.json"],
                    "val": ["val.json"], "test": ["test.json"], "image_root": "images",
                    "answer_list": "answers.json", "limit": None}
    spec.pop("export")  # the ONNX path is the pipeline test's; this one is about scoring
    (folder / "specs").mkdir()
    (folder / "specs/xvlm_testdev.yaml").write_text(yaml.safe_dump(spec))
    return len(files["test"])


@pytest.mark.e2e
def test_a_test_split_without_answers_is_predicted_not_scored(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    questions = xvlm_vqa_project(folder)
    out = sh([*EVLM, "run", "specs/xvlm_testdev.yaml"], folder).stdout
    assert "not scored: the test split has no answers" in out
    run = folder / "runs/xvlm_testdev"
    predictions = json.loads((run / "evaluate/predictions.json").read_text())
    assert len(predictions) == questions
    assert [p["question_id"] for p in predictions] == [1044, 1045, 1046, 1047]
    assert all(p["answer"] in [*COLORS, "yes", "no"] for p in predictions)
    results = EvaluateResults.read(run / "evaluate/metrics.json")
    assert results.student.score.value is None and results.student.retention is None
    assert "no answers" in results.student.score.unscored
    assert results.teacher.score.value is None and results.dense.value is None
    teacher_eval = next((folder / "runs/shared").glob("teacher_eval-*"))
    assert TeacherResults.read(teacher_eval / "metrics.json").score.value is None
    assert len(json.loads((teacher_eval / "predictions.json").read_text())) == questions
    shutil.rmtree(folder / ".dvc/cache", ignore_errors=True)
