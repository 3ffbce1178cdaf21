"""Physical removal: the sliced model computes what the gated model did, and is as small as predicted."""

import pytest
import torch

from evlm_cli.compress.slice import slice_model
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.vlm import VLM, param_breakdown, prunable_groups
from tests.helpers.models import model_and_inputs, random_gates


def outputs(model, x, gates=None):
    with torch.no_grad():
        out = model(*x, gates=gates)
    return out, model.logits("vqa", out), model.logits("itm", out)


def predicted_params(model: VLM, gates) -> int:
    """Total minus the cost of every unit whose gate (or layer gate) is zero."""
    removed = 0
    groups = prunable_groups(model.config, ("heads", "ffn"))
    for grp in groups:
        layer_unit = {"heads": "attn_layer", "cross_heads": "cross_layer", "ffn": "ffn_layer"}[grp.unit]
        layer_on = bool(gates.get(f"{grp.encoder}.{grp.layer}.{layer_unit}", torch.ones(1)).item())
        kept = int((gates[grp.name] != 0).sum()) if layer_on else 0
        removed += (grp.size - kept) * grp.unit_params
    return param_breakdown(model)["total"] - removed


@pytest.mark.parametrize("sparsity,norm,pool", [(0.3, "post", "cls"), (0.5, "post", "cls"),
                                               (0.8, "post", "cls"), (0.5, "pre", "max")])
def test_sliced_model_equals_gated_model(sparsity, norm, pool, tmp_path):
    model, x = model_and_inputs(norm, pool)
    gates = random_gates(model, sparsity, seed=int(sparsity * 10))
    sliced = slice_model(model, gates)
    ref, ref_vqa, ref_itm = outputs(model, x, gates)
    out, vqa, itm = outputs(sliced, x)
    assert (out.fusion.last - ref.fusion.last).abs().max() < 1e-5
    assert (vqa - ref_vqa).abs().max() < 1e-5 and (itm - ref_itm).abs().max() < 1e-5
    assert (out.vision.last - ref.vision.last).abs().max() < 1e-5
    # ungated output differs, so the comparison above is not vacuous
    assert (outputs(model, x)[1] - ref_vqa).abs().max() > 1e-3
    assert sliced.config.vision.encoder.heads[1] == 0 and sliced.config.text.encoder.ffn[0] == 0
    assert sliced.config.pool == pool and sliced.config.fusion.norm == norm
    # exact parameter count, and it survives a save/load with no manual step
    assert param_breakdown(sliced)["total"] == predicted_params(model, gates)
    save_model(sliced, tmp_path / "s")
    reloaded = load_model(tmp_path / "s").eval()
    assert torch.equal(outputs(reloaded, x)[1], vqa)


def test_slicing_without_gates_changes_nothing():
    model, x = model_and_inputs()
    sliced = slice_model(model, {})
    assert param_breakdown(sliced) == param_breakdown(model)
    assert torch.equal(outputs(sliced, x)[1], outputs(model, x)[1])
