"""Evaluate's arithmetic on timings: the exported files' speedups, and the rows bench keeps."""

import pytest

from evlm_cli.recipe.bench import _batch_of
from evlm_cli.recipe.evaluate import TEACHER_ONNX, exported_speedups


def test_an_exported_file_is_measured_against_the_faster_teacher_runtime():
    latency = {"batch_1": {"teacher": 8.0, TEACHER_ONNX: 4.0, "onnx_fp32": 2.0},
               "batch_32": {"teacher": 30.0, TEACHER_ONNX: 40.0, "onnx_fp32": 10.0},
               "batch_32_bf16": {"teacher": 20.0, "onnx_fp32": None}}  # not timed there
    s = exported_speedups(latency, "onnx_fp32")
    assert s["speedup"] == {"batch_1": 2.0, "batch_32": 4.0}
    assert s["speedup_over_pytorch_teacher"] == {"batch_1": 4.0, "batch_32": 3.0}
    # ONNX Runtime's teacher at batch 1, PyTorch's at batch 32
    assert s["speedup_over_fastest_teacher"] == {"batch_1": 2.0, "batch_32": 3.0}


@pytest.mark.parametrize("setting, batch", [("batch_1", 1), ("batch_32_bf16", 32),
                                            ("cpu_batch_8", 8)])
def test_each_latency_row_names_its_batch_size(setting, batch):
    assert _batch_of(setting) == batch
