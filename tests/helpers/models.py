"""Tiny VLMs for the tests: configurations, a model with inputs, and random deterministic gates."""

import torch

from evlm_cli.models.config import VLMConfig, make_config
from evlm_cli.models.vlm import VLM, prunable_groups


def tiny_config(**kw) -> VLMConfig:
    """Two layers per encoder, 16-pixel images, 40 tokens, every head; `kw` overrides any of it."""
    base = dict(vision=dict(layers=2, width=32, heads=4, ffn=64),
                text=dict(layers=2, width=24, heads=3, ffn=48),
                fusion=dict(layers=2, width=24, heads=3, ffn=48), image_size=16, patch_size=8,
                vocab_size=40, max_positions=16, heads=["vqa", "itm", "itc", "mlm"], num_answers=5,
                embed_dim=8)
    base.update(kw)
    return make_config(**base)


def model_and_inputs(norm="post", pool="cls"):
    """A tiny VQA/ITM/ITC model with large random weights (std 0.3, so that a pruned unit
    changes the output) and a batch of 3 with padding in one row."""
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
    """Random deterministic gates: soft values in (0.2, 1] on kept units, exact zeros elsewhere.

    Whatever the draw, vision layer 1 loses all its heads and text layer 0 all its FFN neurons,
    and fusion layer 1's cross-attention has a soft layer gate (0.7). Written for the model of
    `model_and_inputs` (or one with at least as many layers and units).
    """
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
