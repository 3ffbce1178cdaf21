"""Export stage: the fine-tuned student as ONNX (fp32, optionally int8), checked against PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from evlm_cli.core.config import Params
from evlm_cli.core.errors import TrainingError
from evlm_cli.core.io import atomic_path, atomic_write_json
from evlm_cli.data.loader import PreparedData
from evlm_cli.deploy.onnx import FP32_FILE, INT8_FILE, OnnxModel, export_onnx, quantize_int8
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.vlm import TaskLogits
from evlm_cli.recipe.scoring import fixed_batch
from evlm_cli.training.loop import setup

# The exported fp32 graph must compute what PyTorch does; float reordering stays far below this.
PARITY_TOLERANCE = 1e-4
EXPORT_SEED = 0


def export_student(student: Path, prepared: Path, task: str, opset: int, int8: bool,
                   out: Path, threads: int | None = None) -> dict:
    """Write out/model.onnx (and model.int8.onnx) and out/export.json; return the summary.

    The parity check runs test examples through both at two batch sizes; their text
    lengths differ, so the free axes are exercised too.
    """
    data = PreparedData(prepared)
    model = load_model(student).eval()
    forward = TaskLogits(model, task)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        export_onnx(model, task, fixed_batch(data, 2), tmp / FP32_FILE, opset)
        exported = OnnxModel(tmp / FP32_FILE, threads)
        worst = 0.0
        for batch_size in (1, 7):
            inputs = fixed_batch(data, batch_size)
            with torch.inference_mode():
                expected = forward(*inputs)
            worst = max(worst, (exported(*inputs) - expected).abs().max().item())
        if worst > PARITY_TOLERANCE:
            raise TrainingError(f"export: the ONNX model differs from PyTorch by {worst:.2e} "
                                f"(more than {PARITY_TOLERANCE:g})")
        files = {"fp32": FP32_FILE}
        if int8:
            quantize_int8(tmp / FP32_FILE, tmp / INT8_FILE)
            files["int8"] = INT8_FILE
        summary = {"opset": opset, "task": task, "files": files,
                   "size_bytes": {k: (tmp / f).stat().st_size for k, f in files.items()},
                   "parity_max_abs_diff": worst}
        atomic_write_json(tmp / "export.json", summary)
    return summary


def run_export(params: Params, *, prepared: Path, student: Path, onnx: Path) -> dict:
    e = params.export
    setup(EXPORT_SEED, params.resources.threads, "cpu")  # ONNX Runtime serves from the CPU here
    return export_student(student, prepared, params.task, e.opset, e.int8, onnx,
                          params.resources.threads)
