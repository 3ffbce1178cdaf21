"""The final selection meets the target sparsity whether or not training converged, chooses
units by their gates within it, and keeps every encoder at or above its floor (min_keep)."""

import pytest
import torch

from evlm_cli.compress.l0 import KEPT_LOG_ALPHA, LOG_ALPHA_RANGE, L0Gates, SparsityConstraint
from evlm_cli.compress.slice import slice_model
from evlm_cli.models.config import make_config
from evlm_cli.models.groups import PrunableGroup
from evlm_cli.models.vlm import VLM, param_breakdown
from evlm_cli.recipe.prune import budget_warnings
from tests.helpers.gates import set_log_alpha, step_all, train_two_modalities

TOLERANCE = 0.005
# Far too few for the multipliers to bring the expected sparsity to any of the targets.
UNCONVERGED_STEPS = 5


def sparsity(gates, masks, encoder=None):
    return 1 - gates.kept_params_from_masks(masks, encoder) / gates.total_params(encoder)


def narrow_wide_vlm() -> VLM:
    """A tiny VLM whose smallest unit (an FFN neuron, 33 parameters) is under 0.5% of each
    encoder: a budget can only be met to within one unit, as in real models (0.07% at the
    default student's sizes)."""
    encoder = dict(width=16, heads=2, ffn=256)
    cfg = make_config(vision=dict(layers=2, **encoder), text=dict(layers=1, **encoder),
                      fusion=dict(layers=1, **encoder), image_size=16, patch_size=8,
                      vocab_size=30, max_positions=6, heads=["vqa"], num_answers=4)
    return VLM(cfg)


def half_trained(mode, target, min_keep=0.0, seed=0):
    """Gates of a tiny VLM after a few Lagrangian-only steps, with scattered log_alpha."""
    torch.manual_seed(seed)
    model = narrow_wide_vlm()
    gates = L0Gates(model.prunable_groups(("heads", "ffn")))
    # Scattered scores that start far from the target, on the side away from it.
    with torch.no_grad():
        for p in gates.log_alpha.values():
            p.normal_(3.0 if target >= 0.5 else -3.0, 2.0)
    constraint = SparsityConstraint(gates, mode, target, min_keep=min_keep)
    optims = [torch.optim.Adam(gates.parameters(), lr=0.1), constraint.ascent_optimizer(0.1)]
    for step in range(UNCONVERGED_STEPS):
        step_all(optims, constraint.loss(step, UNCONVERGED_STEPS), gates)
    return model, gates, constraint


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_modal_adaptive_meets_every_target_overall(target):
    model, gates, constraint = half_trained("modal-adaptive", target)
    assert constraint.training_gap() > 0.02  # training alone is far off
    masks = constraint.final_masks()
    assert sparsity(gates, masks) == pytest.approx(target, abs=TOLERANCE)
    assert sparsity(gates, masks) >= target - 1e-9  # the budget is a ceiling on what is kept
    # The sliced model is exactly as much smaller as the masks say.
    sliced = slice_model(model.eval(), gates.eval().deterministic_values(masks))
    removed = param_breakdown(model)["total"] - param_breakdown(sliced)["total"]
    assert removed == gates.total_params() - gates.kept_params_from_masks(masks)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_uniform_meets_every_target_in_each_encoder(target):
    _, gates, constraint = half_trained("uniform", target)
    masks = constraint.final_masks()
    for encoder in gates.encoders:
        assert sparsity(gates, masks, encoder) == pytest.approx(target, abs=TOLERANCE), encoder


def test_units_are_chosen_by_gate_score_and_a_big_unit_gives_way_to_small_ones():
    gates = L0Gates([PrunableGroup("vision.0.heads", "vision", "heads", 0, 2, 10),
                     PrunableGroup("text.0.ffn", "text", "ffn", 0, 4, 3)])
    set_log_alpha(gates, "vision.0.heads", [5.0, 1.0])
    set_log_alpha(gates, "text.0.ffn", [4.0, 2.0, 0.5, -3.0])
    # 19 of 32: the best head (10), the ffn units at 4 and 2 (6); the second head (10) would
    # overrun, so the next ffn unit (3) takes its place, and the last one no longer fits.
    masks = gates.masks_within({None: 19})
    assert masks["vision.0.heads"].tolist() == [True, False]
    assert masks["text.0.ffn"].tolist() == [True, True, True, False]
    # Per encoder: each encoder's own best units.
    masks = gates.masks_within({"vision": 10, "text": 6})
    assert masks["vision.0.heads"].tolist() == [True, False]
    assert masks["text.0.ffn"].tolist() == [True, True, False, False]


def listed_in(groups, order):
    """The same groups with the encoders listed in `order` (each encoder's own order kept)."""
    return [g for encoder in order for g in groups if g.encoder == encoder]


ORDERS = (("vision", "text", "fusion"), ("fusion", "text", "vision"))


def test_a_tie_is_split_by_each_encoders_share_of_it_in_either_order():
    groups = [PrunableGroup("vision.0.ffn", "vision", "ffn", 0, 4, 10),
              PrunableGroup("text.0.heads", "text", "heads", 0, 2, 20)]
    for order in (("vision", "text"), ("text", "vision")):
        gates = L0Gates(listed_in(groups, order))
        set_log_alpha(gates, "vision.0.ffn", [3.0] * 4)
        set_log_alpha(gates, "text.0.heads", [3.0] * 2)
        # Half the budget: half of each encoder's tied parameters, not all of the first listed.
        masks = gates.masks_within({None: 40})
        assert masks["vision.0.ffn"].tolist() == [True, True, False, False], order
        assert masks["text.0.heads"].tolist() == [True, False], order


def clamped_scores(gates):
    """Scores as training leaves them when it stops early, heads having started kept: most
    pinned at the clamp's top, so the budget cuts through a tie. Each unit's score follows its
    name, not the position of its group in the list."""
    generator = torch.Generator().manual_seed(1)
    for g in sorted(gates.groups, key=lambda g: g.name):
        scores = torch.randn(g.size, generator=generator) * 4.0 + 12.0
        set_log_alpha(gates, g.name, scores.clamp(*LOG_ALPHA_RANGE).tolist())


def identical_scores(gates):
    for g in gates.groups:
        set_log_alpha(gates, g.name, [KEPT_LOG_ALPHA] * g.size)


@pytest.mark.parametrize("scores", [identical_scores, clamped_scores])
@pytest.mark.parametrize("min_keep", [0.0, 0.05])
def test_tied_gates_listed_in_two_encoder_orders_give_the_same_allocation(scores, min_keep):
    groups = narrow_wide_vlm().prunable_groups(("heads", "ffn"))
    allocations = []
    for order in ORDERS:
        gates = L0Gates(listed_in(groups, order))
        scores(gates)
        masks = SparsityConstraint(gates, "modal-adaptive", 0.5, min_keep=min_keep).final_masks()
        assert 0.5 - 1e-9 <= sparsity(gates, masks) <= 0.5 + TOLERANCE
        allocations.append({name: mask.tolist() for name, mask in masks.items()})
        if scores is identical_scores:
            # Nothing tells the encoders apart, so each gives up half, within its largest unit.
            for encoder in gates.encoders:
                largest = max(g.unit_params for g in gates.groups if g.encoder == encoder)
                assert sparsity(gates, masks, encoder) == pytest.approx(
                    0.5, abs=largest / gates.total_params(encoder)), encoder
    assert allocations[0] == allocations[1]


def test_floors_are_chosen_first_and_count_towards_the_budget():
    gates = L0Gates([PrunableGroup("vision.0.ffn", "vision", "ffn", 0, 4, 1),
                     PrunableGroup("text.0.ffn", "text", "ffn", 0, 4, 1)])
    set_log_alpha(gates, "vision.0.ffn", [5.0, 4.0, 3.0, 2.0])
    set_log_alpha(gates, "text.0.ffn", [-5.0, -6.0, -7.0, -8.0])
    assert gates.masks_within({None: 4})["text.0.ffn"].sum() == 0
    masks = gates.masks_within({None: 4}, floors={"text": 1})
    assert masks["text.0.ffn"].tolist() == [True, False, False, False]
    assert masks["vision.0.ffn"].tolist() == [True, True, True, False]
    # A floor never overruns the budget.
    masks = gates.masks_within({None: 2}, floors={"text": 3})
    assert masks["text.0.ffn"].tolist() == [True, True, False, False]
    assert masks["vision.0.ffn"].sum() == 0


def test_a_floor_is_reached_even_when_that_takes_part_of_a_unit_more():
    gates = L0Gates([PrunableGroup("vision.0.ffn", "vision", "ffn", 0, 4, 3),
                     PrunableGroup("text.0.ffn", "text", "ffn", 0, 4, 3)])
    set_log_alpha(gates, "text.0.ffn", [-5.0, -6.0, -7.0, -8.0])
    masks = gates.masks_within({None: 12}, floors={"text": 4})
    assert gates.kept_params_from_masks(masks, "text") == 6
    assert gates.kept_params_from_masks(masks) == 12


def test_a_unit_under_a_dropped_sublayer_comes_last_and_revives_it():
    gates = L0Gates([PrunableGroup("vision.0.heads", "vision", "heads", 0, 2, 5),
                     PrunableGroup("vision.0.attn_layer", "vision", "attn_layer", 0, 1, 0),
                     PrunableGroup("vision.0.ffn", "vision", "ffn", 0, 2, 5)])
    set_log_alpha(gates, "vision.0.attn_layer", [-8.0])
    set_log_alpha(gates, "vision.0.heads", [9.0, 8.0])
    set_log_alpha(gates, "vision.0.ffn", [-1.0, -2.0])
    masks = gates.masks_within({None: 10})
    assert masks["vision.0.ffn"].tolist() == [True, True]
    assert masks["vision.0.heads"].tolist() == [False, False]
    assert not masks["vision.0.attn_layer"].item()
    masks = gates.masks_within({None: 15})
    assert masks["vision.0.heads"].tolist() == [True, False]
    assert masks["vision.0.attn_layer"].item()
    assert gates.kept_params_from_masks(masks) == 15


def test_the_floor_holds_when_only_one_modality_matters():
    """The label depends on the vision input only; at 0.9 the text side would be wiped out."""
    free = train_two_modalities("modal-adaptive", target=0.9, hidden=128)
    floored = train_two_modalities("modal-adaptive", target=0.9, hidden=128, min_keep=0.05)
    for gates, constraint in (free, floored):
        masks = constraint.final_masks()
        assert sparsity(gates, masks) == pytest.approx(0.9, abs=TOLERANCE)
    gates, constraint = free
    assert 1 - sparsity(gates, constraint.final_masks(), "text") < 0.05  # the floor matters
    gates, constraint = floored
    masks = constraint.final_masks()
    for encoder in gates.encoders:
        assert 1 - sparsity(gates, masks, encoder) >= 0.05, encoder
    # The training penalty already held the text encoder near its floor.
    assert 1 - gates.expected_sparsity("text").item() > 0.04


def test_min_keep_above_what_the_target_leaves_is_refused():
    gates = L0Gates([PrunableGroup("vision.0.ffn", "vision", "ffn", 0, 4, 1)])
    with pytest.raises(ValueError, match="min_keep"):
        SparsityConstraint(gates, "modal-adaptive", 0.9, min_keep=0.2)
    # Uniform mode has no floor to honour: each encoder meets the target itself.
    assert SparsityConstraint(gates, "uniform", 0.9, min_keep=0.2).min_keep == 0.0


def test_warnings_name_the_gap_and_the_encoder_at_its_floor():
    report = {"training_gap": 0.05,
              "encoders": {"vision": {"sparsity": 0.949}, "text": {"sparsity": 0.5}}}
    lines = budget_warnings(report, "modal-adaptive", 0.7, 0.05)
    assert len(lines) == 2
    assert "0.050 from the target 0.7" in lines[0]
    assert "vision encoder keeps 0.051" in lines[1]
    report["training_gap"] = 0.01
    assert budget_warnings(report, "modal-adaptive", 0.7, 0.0) == []


def test_a_fusion_encoder_without_cross_attention_is_warned_of():
    layers = [{"layer": 0, "cross_heads": {"kept": 0, "total": 4}},
              {"layer": 1, "cross_heads": {"kept": 0, "total": 4}}]
    report = {"training_gap": 0.0, "encoders": {"fusion": {"sparsity": 0.5, "layers": layers}}}
    (line,) = budget_warnings(report, "uniform", 0.5, 0.0)
    assert "keeps no cross-attention head" in line
    layers[1]["cross_heads"]["kept"] = 1
    assert budget_warnings(report, "uniform", 0.5, 0.0) == []
