"""Physical removal: the sliced model computes what the gated model did, and is as small as predicted."""

import pytest
import torch

from evlm_cli.compress.slice import slice_model
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.config import make_config
from evlm_cli.models.vlm import VLM, param_breakdown, prunable_groups


def model_and_inputs(norm="post", pool="cls"):
    torch.manual_seed(0)
    cfg = make_config(vision=dict(layers=3, width=32, heads=4, ffn=64),
                      text=dict(layers=2, width=24, heads=3, ffn=48, norm=norm),
                      fusion=dict(layers=2, width=24, heads=3, ffn=48, norm=norm), image_size=16,
                      patch_size=8, vocab_size=40, max_positions=16, heads=["vqa", "itm", "itc"],
                      num_answers=5, embed_dim=8, pool=pool)
    model = VLM(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 16, 16, generator=g)
    ids = torch.randint(1, 40, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, -3:] = 0
    return model, (images, ids, mask)


def random_gates(model: VLM, sparsity: float, units=("heads", "ffn", "layers"), seed=0):
    """Random deterministic gates: soft values in (0.2, 1] on kept units, exact zeros elsewhere."""
    g = torch.Generator().manual_seed(seed)
    gates = {}
    for grp in prunable_groups(model.config, units):
        if grp.unit.endswith("_layer"):
            gates[grp.name] = torch.tensor([1.0]) if torch.rand(1, generator=g) > 0.15 else torch.zeros(1)
            continue
        values = 0.2 + 0.8 * torch.rand(grp.size, generator=g)
        drop = torch.randperm(grp.size, generator=g)[: round(sparsity * grp.size)]
        values[drop] = 0
        gates[grp.name] = values
    gates["vision.1.heads"] = torch.zeros(4)  # a layer with all heads pruned
    gates["text.0.ffn"] = torch.zeros(48)  # a layer with all FFN neurons pruned
    gates["fusion.1.cross_layer"] = torch.tensor([0.7])  # a soft layer gate is folded too
    return gates


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
