"""The GPU check script runs, on the CPU, the steps it runs on a GPU: so it is known to work
before a GPU is lent (benchmarks/gpu_check.py)."""

import subprocess
import sys

import pytest

from tests.helpers.pipeline import REPO

pytestmark = pytest.mark.e2e


def test_the_gpu_check_passes_in_its_cpu_mode(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu_check.py"), "--cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    out = done.stdout
    assert "gpu_check: passed" in out
    # the figures it exists to print: the metric, each latency row, the exported file
    assert "vqa_accuracy: teacher" in out
    assert "batch_1" in out and "batch_32" in out
    assert "onnx_fp32: vqa_accuracy" in out
    assert "kernels without a deterministic version: none" in out
    assert (tmp_path / "1p/runs/gpu_check_1p/evaluate/metrics.json").is_file()
