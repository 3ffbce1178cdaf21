"""Physical removal: turn deterministic gates into a smaller model that computes the same thing.

Kept heads and neurons keep their order; their gate values are folded into the output
projections, and a layer gate scales the whole sublayer (bias included), so the sliced model
equals the gated one. A sublayer with nothing left keeps only its (scaled) output bias.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evlm_cli.models.blocks import Attention, Block, Gates
from evlm_cli.models.config import ENCODERS, EncoderConfig
from evlm_cli.models.vlm import LAYER_PREFIX, VLM


def _kept(gates: Gates, key: str, size: int, layer_gate: Tensor | None) -> tuple[Tensor, Tensor]:
    """Indices of the units to keep and the factor folded into each (unit gate x layer gate)."""
    values = gates.get(key)
    values = torch.ones(size) if values is None else values.detach().float().cpu().reshape(size)
    layer = 1.0 if layer_gate is None else float(layer_gate.detach().reshape(()))
    keep = torch.nonzero(values * layer).flatten() if layer else torch.zeros(0, dtype=torch.long)
    return keep, values[keep] * layer


def _slice_attention(old: Attention, keep: Tensor, scale: Tensor, layer_scale: float) -> dict:
    hd = old.head_dim
    rows = (keep[:, None] * hd + torch.arange(hd)).flatten().to(old.out_bias.device)
    out = {"out_bias": old.out_bias * layer_scale}
    if len(keep):
        for name in ("q", "k", "v"):
            lin = getattr(old, name)
            out[f"{name}.weight"], out[f"{name}.bias"] = lin.weight[rows], lin.bias[rows]
        out["out.weight"] = old.out.weight[:, rows] * scale.to(old.out.weight).repeat_interleave(hd)[None]
    table = getattr(old, "relative_position_bias_table", None)
    if table is not None:  # a Swin window attention: each head's bias column goes with it
        out["relative_position_bias_table"] = table[:, keep.to(table.device)]
    return out


def _slice_block(block: Block, gates: Gates, prefix: str) -> tuple[dict, dict]:
    """The sliced tensors of one layer (block-relative keys) and its new shape."""
    state = {k: v for k, v in block.state_dict().items()
             if not k.startswith(("attn.", "cross.", "mlp."))}  # the norms
    shape = {}
    for sub, unit, layer_unit in (("attn", "heads", "attn_layer"), ("cross", "cross_heads", "cross_layer")):
        attn = getattr(block, sub)
        if attn is None:
            continue
        layer_gate = gates.get(f"{prefix}.{layer_unit}")
        keep, scale = _kept(gates, f"{prefix}.{unit}", attn.heads, layer_gate)
        layer_scale = 1.0 if layer_gate is None else float(layer_gate.reshape(()))
        state.update({f"{sub}.{k}": v for k, v in _slice_attention(attn, keep, scale, layer_scale).items()})
        shape[unit] = len(keep)
    mlp = block.mlp
    layer_gate = gates.get(f"{prefix}.ffn_layer")
    keep, scale = _kept(gates, f"{prefix}.ffn", mlp.hidden, layer_gate)
    layer_scale = 1.0 if layer_gate is None else float(layer_gate.reshape(()))
    state["mlp.fc2_bias"] = mlp.fc2_bias * layer_scale
    if len(keep):
        keep = keep.to(mlp.fc2_bias.device)
        state["mlp.fc1.weight"], state["mlp.fc1.bias"] = mlp.fc1.weight[keep], mlp.fc1.bias[keep]
        state["mlp.fc2.weight"] = mlp.fc2.weight[:, keep] * scale.to(mlp.fc2.weight)[None]
    shape["ffn"] = len(keep)
    return state, shape


@torch.no_grad()
def slice_model(model: VLM, gates: Gates) -> VLM:
    """A new, smaller VLM equal to `model` run with these (deterministic) gates."""
    cfg = model.config
    encoders = {"vision": model.vision.encoder, "text": model.text, "fusion": model.fusion}
    state = {k: v for k, v in model.state_dict().items()
             if not any(k.startswith(p + ".") for p in LAYER_PREFIX.values())}
    new_encoders = []
    for enc in ENCODERS:
        old: EncoderConfig = cfg.encoder(enc)
        heads, ffn, cross = [], [], [] if old.has_cross else None
        for i, block in enumerate(encoders[enc].layers):
            block_state, shape = _slice_block(block, gates, f"{enc}.{i}")
            state.update({f"{LAYER_PREFIX[enc]}.{i}.{k}": v.clone() for k, v in block_state.items()})
            heads.append(shape["heads"])
            ffn.append(shape["ffn"])
            if cross is not None:
                cross.append(shape["cross_heads"])
        new_encoders.append(EncoderConfig(width=old.width, head_dim=old.head_dim, heads=heads, ffn=ffn,
                                          norm=old.norm, act=old.act, eps=old.eps, cross_heads=cross,
                                          kv_width=old.kv_width))
    sliced = VLM(cfg.with_encoders(*new_encoders))
    sliced.load_state_dict(state)
    return sliced.to(next(model.parameters()).device).train(model.training)
