"""The results contract: metrics.json as typed, versioned dataclasses, refused when not the
current schema."""

import json
from dataclasses import replace

import pytest

from evlm_cli.core.errors import EvlmError
from evlm_cli.core.results import (
    SCHEMA_VERSION,
    EvaluateResults,
    Exported,
    Generation,
    Score,
    Size,
    TeacherResults,
)
from tests.helpers.runs import TIMING, results

WHERE = "runs/a/evaluate/metrics.json"


def through_a_file(value) -> dict:
    return json.loads(json.dumps(value))


def full_results() -> EvaluateResults:
    """Every optional part filled: captions, recalls, whole captions, an exported file."""
    r = results((1, 32))
    exported = Exported(runtime="onnxruntime", value=0.9, retention=0.95,
                        retention_of_student=1.0, size_bytes=3_000_000,
                        speedup={"batch_1": 2.0}, over_flops_ratio={"batch_1": 0.5},
                        speedup_over_pytorch_teacher={"batch_1": 1.5},
                        speedup_over_fastest_teacher={"batch_1": 1.5})
    return replace(
        r, student=replace(r.student, score=Score(0.9, by_answer_type={"yes/no": 0.95},
                                                  recall={"tr_r1": 0.5},
                                                  caption={"cider": 0.9})),
        generation={"batch_1": Generation(teacher_ms=30.0, student_ms=10.0, speedup=3.0)},
        warnings=("the text encoder keeps little",), exported={"onnx_fp32": exported})


@pytest.mark.parametrize("made", [lambda: results((1,)), full_results], ids=["bare", "full"])
def test_evaluate_results_survive_a_round_trip_through_json(made):
    r = made()
    data = through_a_file(r.to_json())
    assert data["schema_version"] == SCHEMA_VERSION == 4
    assert list(data)[0] == "schema_version"  # first in the file, where a reader looks
    assert EvaluateResults.from_json(data, WHERE) == r


def test_teacher_results_survive_a_round_trip_through_json():
    t = TeacherResults(metric="vqa_accuracy", score=Score(0.95), size=Size(3, 0.5, 100),
                       params_by_part={"total": 3}, prunable_params={"vision": 1, "total": 1},
                       latency_ms={"batch_1": 2.5}, timing=TIMING)
    assert TeacherResults.from_json(through_a_file(t.to_json()), WHERE) == t


def test_the_file_keeps_numbers_as_leaves_and_absent_figures_as_null():
    data = through_a_file(results((1,)).to_json())
    assert data["student"]["score"]["value"] == 0.9
    assert data["latency_ms"]["batch_1"] == {"teacher": 2.0, "dense_student": 1.5,
                                             "student": 1.0, "onnx_fp32": None,
                                             "onnx_int8": None, "teacher_onnx_fp32": None}
    assert data["dense"]["value"] is None and data["generation"] is None
    assert data["sparsity"] == {"overall": 0.5, "vision": 0.6, "text": 0.4, "fusion": 0.3,
                                "expected_at_end": 0.512, "overruled_share": 0.025}


@pytest.mark.parametrize("version, found", [(0, "schema_version 0"), (2, "schema_version 2"),
                                            ("4", "schema_version '4'"),
                                            (None, "no schema_version")])
def test_another_schema_version_is_refused_with_the_rerun_in_one_line(version, found):
    data = through_a_file(results().to_json())
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    with pytest.raises(EvlmError) as caught:
        EvaluateResults.from_json(data, WHERE, "run a")
    message = str(caught.value)
    assert "\n" not in message
    assert message == (f"{WHERE}: results with {found}, expected 4 (written by another evlm "
                       "version): rerun `evlm run SPEC` for run a (the evaluate stage reruns)")


def test_the_teacher_file_names_its_own_stage_to_rerun():
    data = {"schema_version": 0, "metric": "vqa_accuracy"}
    with pytest.raises(EvlmError, match=r"the teacher_eval stage reruns"):
        TeacherResults.from_json(data, "runs/shared/teacher_eval-x/metrics.json")


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["student"].pop("retention"), "field student.retention is missing"),
    (lambda d: d["student"]["score"].update(value="high"),
     'field student.score.value should be a number, found "high"'),
    (lambda d: d["teacher"]["size"].update(params=3.5),
     "field teacher.size.params should be an integer, found 3.5"),
    (lambda d: d["latency_ms"].update(batch_1=[1.0]),
     "field latency_ms.batch_1 should be an object, found [1.0]"),
    (lambda d: d.update(warnings="none"), 'field warnings should be a list, found "none"'),
    (lambda d: d["sparsity"].update(decoder=0.1), "unknown field sparsity.decoder"),
    (lambda d: d["speedup"]["batch_1"].update(total=True),
     "field speedup.batch_1.total should be a number, found true"),
])
def test_a_missing_or_mistyped_field_is_one_line_naming_it(edit, message):
    data = through_a_file(results().to_json())
    edit(data)
    with pytest.raises(EvlmError) as caught:
        EvaluateResults.from_json(data, WHERE)
    assert str(caught.value).startswith(f"{WHERE}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.e2e
def test_the_contract_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, evlm_cli.core.results; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_split_without_answers_round_trips_as_not_scored():
    r = results((1,))
    unscored = Score(None, unscored="not scored: the test split has no answers")
    r = replace(r, teacher=replace(r.teacher, score=unscored),
                student=replace(r.student, score=unscored, retention=None))
    data = through_a_file(r.to_json())
    assert data["student"]["score"]["value"] is None and data["student"]["retention"] is None
    assert EvaluateResults.from_json(data, WHERE) == r
