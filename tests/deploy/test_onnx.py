"""ONNX export: the exported graph computes what PyTorch does, pruned layers included."""

import onnx
import onnxruntime  # noqa: F401  (the test extra has it: a missing one fails, not skips)
import pytest
import torch

from evlm_cli.compress.slice import slice_model
from evlm_cli.core.errors import EvlmError
from evlm_cli.deploy.onnx import OnnxModel, export_onnx, quantize_int8
from tests.helpers.models import model_and_inputs, random_gates

OPSET = 17


def pruned_model(pool: str):
    """A sliced model: layers of different widths, a layer with no heads, one with no FFN."""
    model, _ = model_and_inputs(norm="pre", pool=pool)
    sliced = slice_model(model, random_gates(model, 0.4)).eval()
    cfg = sliced.config
    assert cfg.vision.encoder.heads[1] == 0 and cfg.text.encoder.ffn[0] == 0
    assert len(set(cfg.vision.encoder.heads)) > 1  # widths differ between layers
    return sliced


def inputs(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # padding in the batch
    return (torch.randn(batch, 3, 16, 16, generator=g), torch.randint(1, 40, (batch, length), generator=g),
            mask)


@pytest.mark.parametrize("pool", ["cls", "max"])
def test_onnx_equals_pytorch_at_other_batch_sizes_and_lengths(tmp_path, pool):
    model = pruned_model(pool)
    path = export_onnx(model, "vqa", inputs(2, 5, seed=0), tmp_path / "model.onnx", OPSET)
    exported = OnnxModel(path, threads=1)
    for batch, length in ((1, 3), (6, 11)):  # neither is the shape the graph was traced with
        x = inputs(batch, length, seed=batch)
        with torch.no_grad():
            expected = model.logits("vqa", model(*x))
        got = exported(*x)
        assert got.shape == expected.shape == (batch, 5)
        assert (got - expected).abs().max().item() < 1e-4


def test_a_student_that_no_longer_reads_images_still_exports_and_runs(tmp_path):
    model, _ = model_and_inputs(norm="pre", pool="max")
    gates = random_gates(model, 0.4)
    for name in gates:
        if name.endswith("cross_heads"):
            gates[name] = torch.zeros_like(gates[name])
    sliced = slice_model(model, gates).eval()
    assert not any(sliced.config.fusion.cross_heads)
    path = export_onnx(sliced, "vqa", inputs(2, 5, seed=0), tmp_path / "model.onnx", OPSET)
    x = inputs(3, 4, seed=1)
    with torch.no_grad():
        expected = sliced.logits("vqa", sliced(*x))
    assert (OnnxModel(path, threads=1)(*x) - expected).abs().max().item() < 1e-4


def test_int8_is_smaller_and_close(tmp_path):
    model = pruned_model("max")
    fp32 = export_onnx(model, "vqa", inputs(2, 5, seed=0), tmp_path / "model.onnx", OPSET)
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx")
    graph = onnx.load(str(int8)).graph
    assert {"MatMulInteger", "DynamicQuantizeLinear"} <= {n.op_type for n in graph.node}
    assert sum(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer) >= 10
    x = inputs(64, 9, seed=3)
    a, b = OnnxModel(fp32)(*x), OnnxModel(int8)(*x)
    assert not torch.equal(a, b)  # it really is another model
    # Dynamic int8 rounds each quantised MatMul's weights to steps of max|w|/127 and its input
    # to steps of its range/255: about 1% relative noise each, for these weights (std 0.3).
    # The graph quantises 30 MatMuls, and independent noise adds in quadrature: ~5% of the
    # logits' norm (measured: 5.4-5.7%, onnxruntime 1.32). 10% leaves room for other runtime
    # versions; a wrong scale or zero point is off by the order of the logits themselves.
    relative = ((a - b).norm() / a.norm()).item()
    assert relative < 0.10, relative
    # and it answers as the fp32 model does (the closest top-two margin here is 5x the error)
    assert torch.equal(a.argmax(dim=1), b.argmax(dim=1))


def test_unreadable_onnx_file_names_the_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(EvlmError, match=r"model\.onnx: cannot be loaded by ONNX Runtime"):
        OnnxModel(bad)


def test_a_missing_runtime_names_the_extra(monkeypatch):
    import builtins

    from evlm_cli.deploy.onnx import require_runtime

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(EvlmError, match=r"onnxruntime is missing\): pip install 'evlm\[export\]'"):
        require_runtime()
