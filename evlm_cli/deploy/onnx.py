"""The student as an ONNX file: exported from PyTorch, optionally int8, run in ONNX Runtime.

A pruned evlm model is an ordinary model whose config lists each layer's widths, so it
exports like any other: no masks, no custom operators. The file takes images, token ids and
the attention mask, with the batch size and the text length free, and returns task logits.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import Tensor

from evlm_cli.core.errors import EvlmError
from evlm_cli.core.packaged import EXPORT_INSTALL
from evlm_cli.models.vlm import VLM, TaskLogits, for_inference

INPUTS = ("images", "input_ids", "attention_mask")
OUTPUT = "logits"
FP32_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"


def require_runtime():
    """onnx and onnxruntime, or an error that names the extra to install."""
    try:
        import onnx
        import onnxruntime
    except ImportError as error:
        raise EvlmError(f"ONNX export needs the packages onnx and onnxruntime ({error.name} is "
                        f"missing): {EXPORT_INSTALL}") from None
    return onnx, onnxruntime


def export_onnx(model: VLM, task: str, example: tuple[Tensor, Tensor, Tensor], path: Path,
                opset: int) -> Path:
    """Write `model` (eval mode, on the CPU) to `path` with dynamic batch and text axes."""
    onnx, _ = require_runtime()
    wrapper = TaskLogits(for_inference(model.cpu()), task).eval()
    dynamic = {"images": {0: "batch"}, "input_ids": {0: "batch", 1: "text"},
               "attention_mask": {0: "batch", 1: "text"}, OUTPUT: {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is the one that needs no extra package; torch warns that a
        # newer one exists, which changes nothing for this graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(t.cpu() for t in example), str(path),
                          input_names=list(INPUTS), output_names=[OUTPUT],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    onnx.checker.check_model(str(path))
    return path


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantisation of the matrix multiplies (weights int8, activations at run time)."""
    require_runtime()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # The quantiser wants shapes inferred and the graph optimised first (its own pre-pass).
    prepared = target.with_name(f".{target.name}.pre")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        prepared.unlink(missing_ok=True)
    return target


class OnnxModel:
    """An ONNX file in an ONNX Runtime CPU session, called like the PyTorch model's logits."""

    def __init__(self, path: Path, threads: int | None = None):
        _, ort = require_runtime()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        # Idle ONNX Runtime threads otherwise spin for a while after each call, taking the
        # cores from whatever runs next, which slows PyTorch timed beside it (docs/onnx.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own types for an unreadable file
            raise EvlmError(f"{path}: cannot be loaded by ONNX Runtime ({error})") from error
        self.path = Path(path)

    @property
    def size_bytes(self) -> int:
        return os.path.getsize(self.path)

    def __call__(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        feeds = {"images": images.float().numpy(), "input_ids": input_ids.long().numpy(),
                 "attention_mask": attention_mask.long().numpy()}
        # The exporter drops an input the output does not read: a student pruned of every
        # cross-attention head no longer reads its images (the prune stage warns of it).
        taken = {node.name for node in self.session.get_inputs()}
        feeds = {name: value for name, value in feeds.items() if name in taken}
        return torch.from_numpy(self.session.run([OUTPUT], feeds)[0])
