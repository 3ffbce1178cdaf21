"""Hard-concrete gates, expected size, deterministic masks and the sparsity Lagrangian."""

import math

import pytest
import torch

from evlm_cli.compress.l0 import (
    GATE_INITS,
    KEPT_LOG_ALPHA,
    LOG_ALPHA_RANGE,
    L0Gates,
    SparsityConstraint,
    sample_hard_concrete,
    target_at,
)
from evlm_cli.models.groups import PrunableGroup
from tests.helpers.gates import set_log_alpha, step_all, train_two_modalities


def tiny_groups():
    return [
        PrunableGroup("vision.0.heads", "vision", "heads", 0, 2, 10),
        PrunableGroup("vision.0.attn_layer", "vision", "attn_layer", 0, 1, 0),
        PrunableGroup("text.0.ffn", "text", "ffn", 0, 3, 4),
    ]


def p_kept(log_alpha):
    """P(z > 0) written out from Louizos et al.: sigmoid(log_alpha - beta * log(-low/high))."""
    return 1 / (1 + math.exp(-(log_alpha - 2 / 3 * math.log(0.1 / 1.1))))


def test_samples_lie_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    log_alpha = torch.zeros(20000, requires_grad=True)
    z = sample_hard_concrete(log_alpha)
    assert z.min() >= 0 and z.max() <= 1
    assert (z == 0).any() and (z == 1).any()
    assert abs((z > 0).float().mean().item() - p_kept(0.0)) < 0.015
    z.sum().backward()
    assert log_alpha.grad.abs().sum() > 0


def groups_of_every_kind():
    return [*tiny_groups(), PrunableGroup("fusion.0.cross_heads", "fusion", "cross_heads", 0, 2, 10)]


def test_head_and_sublayer_gates_start_almost_surely_kept_and_ffn_gates_undecided():
    torch.manual_seed(0)
    gates = L0Gates(groups_of_every_kind(), droprate_init=0.5)
    for name in ("vision.0.heads", "fusion.0.cross_heads", "vision.0.attn_layer"):
        assert gates.log_alpha_of(name).detach() == pytest.approx(
            torch.full_like(gates.log_alpha_of(name), KEPT_LOG_ALPHA), abs=0.05)
        assert gates.prob_nonzero(name).min().item() > 1 - 1e-4, name
    # droprate_init 0.5: log_alpha 0, even odds of keeping.
    ffn = gates.log_alpha_of("text.0.ffn").detach()
    assert torch.sigmoid(ffn).tolist() == pytest.approx([0.5] * 3, abs=0.01)
    # Only the FFN neurons (12 of 52 parameters) count towards the starting sparsity.
    assert gates.total_params() == 52
    assert gates.expected_sparsity().item() == pytest.approx(12 * (1 - p_kept(0.0)) / 52, abs=0.01)


def test_droprate_init_starts_every_unit_gate_undecided_and_sublayers_near_kept():
    torch.manual_seed(0)
    gates = L0Gates(groups_of_every_kind(), droprate_init=0.5, init="droprate")
    for name in ("vision.0.heads", "fusion.0.cross_heads", "text.0.ffn"):
        log_alpha = gates.log_alpha_of(name).detach()
        assert torch.sigmoid(log_alpha).tolist() == pytest.approx([0.5] * len(log_alpha), abs=0.01)
        assert gates.prob_nonzero(name).tolist() == pytest.approx([p_kept(0.0)] * len(log_alpha),
                                                                  abs=0.01)
    assert gates.log_alpha_of("vision.0.attn_layer").item() == pytest.approx(math.log(99), abs=0.05)


def test_an_unknown_gate_init_is_refused():
    with pytest.raises(ValueError, match="gate init"):
        L0Gates(tiny_groups(), init="kept")


def test_training_samples_are_fresh_and_eval_gates_deterministic():
    torch.manual_seed(0)
    gates = L0Gates(tiny_groups())
    first, second = gates(), gates.sample()
    assert not torch.equal(first["text.0.ffn"], second["text.0.ffn"])
    gates.eval()
    assert all(torch.equal(gates()[k], v) for k, v in gates().items())


def test_eval_keeps_top_round_expected_units_with_positive_values():
    gates = L0Gates(tiny_groups()).eval()
    set_log_alpha(gates, "text.0.ffn", [3.0, -4.0, 0.5])  # P kept ~ 0.99, 0.09, 0.90 -> keep 2
    set_log_alpha(gates, "vision.0.heads", [-3.0, 5.0])  # ~ 0.20, 1.00 -> keep 1
    set_log_alpha(gates, "vision.0.attn_layer", [5.0])
    expected_text = sum(p_kept(a) for a in (3.0, -4.0, 0.5))
    masks = gates.deterministic_masks()
    assert masks["text.0.ffn"].sum().item() == round(expected_text) == 2
    assert masks["text.0.ffn"].tolist() == [True, False, True]
    assert masks["vision.0.heads"].tolist() == [False, True]
    values = gates()
    assert values["text.0.ffn"][1] == 0 and (values["text.0.ffn"][[0, 2]] > 0).all()
    assert values["vision.0.heads"][0] == 0 and values["vision.0.heads"][1] == 1.0


def test_dropped_layer_gate_drops_the_units_under_it():
    gates = L0Gates(tiny_groups()).eval()
    set_log_alpha(gates, "vision.0.heads", [5.0, 5.0])
    set_log_alpha(gates, "vision.0.attn_layer", [-5.0])
    masks = gates.deterministic_masks()
    assert not masks["vision.0.attn_layer"].any() and not masks["vision.0.heads"].any()
    assert torch.equal(gates()["vision.0.heads"], torch.zeros(2))


def test_expected_params_matches_hand_computation_with_layer_gate():
    gates = L0Gates(tiny_groups())
    heads, layer, ffn = [1.0, -2.0], [0.5], [2.0, 0.0, -1.0]
    set_log_alpha(gates, "vision.0.heads", heads)
    set_log_alpha(gates, "vision.0.attn_layer", layer)
    set_log_alpha(gates, "text.0.ffn", ffn)
    vision = 10 * sum(map(p_kept, heads)) * p_kept(layer[0])
    text = 4 * sum(map(p_kept, ffn))
    assert gates.total_params() == 32 and gates.total_params("vision") == 20
    assert gates.expected_params("vision").item() == pytest.approx(vision, rel=1e-5)
    assert gates.expected_params().item() == pytest.approx(vision + text, rel=1e-5)
    assert gates.expected_sparsity("text").item() == pytest.approx(1 - text / 12, rel=1e-5)
    gates.expected_sparsity().backward()
    assert gates.log_alpha_of("vision.0.attn_layer").grad.abs().item() > 0


def test_kept_params_from_masks_is_exact():
    gates = L0Gates(tiny_groups())
    masks = {"vision.0.heads": torch.tensor([1, 1]), "vision.0.attn_layer": torch.tensor([1]),
             "text.0.ffn": torch.tensor([1, 0, 1])}
    assert gates.kept_params_from_masks(masks) == 2 * 10 + 2 * 4
    masks["vision.0.attn_layer"] = torch.tensor([0])
    assert gates.kept_params_from_masks(masks) == 8
    assert gates.kept_params_from_masks(masks, "vision") == 0


def test_summary_reports_kept_units_and_sparsity():
    gates = L0Gates(tiny_groups())
    masks = {"vision.0.heads": torch.tensor([0, 1]), "vision.0.attn_layer": torch.tensor([1]),
             "text.0.ffn": torch.tensor([1, 0, 0])}
    summary = gates.summary(masks)
    assert summary["kept_params"] == 14 and summary["sparsity"] == pytest.approx(1 - 14 / 32)
    layer = summary["encoders"]["vision"]["layers"][0]
    assert layer["heads"] == {"kept": 1, "total": 2, "kept_indices": [1]}
    assert summary["encoders"]["text"]["sparsity"] == pytest.approx(1 - 4 / 12)
    assert 0 < summary["expected_sparsity"] < 1


def test_clamp_keeps_log_alpha_in_range():
    gates = L0Gates(tiny_groups())
    set_log_alpha(gates, "text.0.ffn", [50.0, -50.0, 1.0])
    gates.clamp_()
    assert gates.log_alpha_of("text.0.ffn").tolist() == [LOG_ALPHA_RANGE[1], LOG_ALPHA_RANGE[0], 1.0]


def test_target_ramps_linearly_then_holds():
    assert target_at(0, 100, 0.6, 0.5) == 0.0
    assert target_at(25, 100, 0.6, 0.5) == pytest.approx(0.3)
    assert target_at(80, 100, 0.6, 0.5) == pytest.approx(0.6)
    assert target_at(0, 100, 0.6, 0.0) == pytest.approx(0.6)


def test_none_mode_and_bad_mode():
    constraint = SparsityConstraint(L0Gates(tiny_groups()), "none", 0.5)
    assert not constraint.uses_gates and constraint.loss(3, 10).item() == 0.0
    assert constraint.ascent_optimizer(0.1) is None
    with pytest.raises(ValueError, match="pruning mode"):
        SparsityConstraint(L0Gates(tiny_groups()), "global", 0.5)


def two_encoder_groups():
    groups = []
    for enc, width in (("vision", 3), ("text", 2)):
        for i in range(2):
            groups += [PrunableGroup(f"{enc}.{i}.heads", enc, "heads", i, 4, 10 * width),
                       PrunableGroup(f"{enc}.{i}.ffn", enc, "ffn", i, 16, 2 * width),
                       PrunableGroup(f"{enc}.{i}.ffn_layer", enc, "ffn_layer", i, 1, 0)]
    return groups


@pytest.mark.parametrize("init", GATE_INITS)
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_lagrangian_alone_reaches_target(target, init):
    torch.manual_seed(0)
    gates = L0Gates(two_encoder_groups(), init=init)
    # The target ramps up as the stage ramps it: set at once, it leaves head gates that start
    # kept far behind while the multipliers grow, and the overshoot takes longer to settle.
    constraint = SparsityConstraint(gates, "modal-adaptive", target, warmup_fraction=0.5)
    optimizers = [torch.optim.Adam(gates.parameters(), lr=0.1), constraint.ascent_optimizer(0.1)]
    assert gates.expected_sparsity().item() < 0.25
    for step in range(300):
        step_all(optimizers, constraint.loss(step, 300), gates)
    assert gates.expected_sparsity().item() == pytest.approx(target, abs=0.02)


def test_modal_adaptive_prunes_the_useless_modality_more():
    gates, _ = train_two_modalities("modal-adaptive")
    vision, text = gates.expected_sparsity("vision").item(), gates.expected_sparsity("text").item()
    assert vision < text - 0.2
    assert gates.expected_sparsity().item() == pytest.approx(0.5, abs=0.03)


def test_uniform_reaches_target_in_each_encoder():
    gates, _ = train_two_modalities("uniform")
    assert gates.expected_sparsity("vision").item() == pytest.approx(0.5, abs=0.03)
    assert gates.expected_sparsity("text").item() == pytest.approx(0.5, abs=0.03)


def test_overruled_counts_the_units_a_final_selection_decides_against_the_gates():
    gates = L0Gates(tiny_groups()).eval()
    set_log_alpha(gates, "vision.0.heads", [5.0, 5.0])
    set_log_alpha(gates, "vision.0.attn_layer", [5.0])
    set_log_alpha(gates, "text.0.ffn", [5.0, -5.0, -5.0])
    decided = gates.deterministic_masks()
    assert decided["text.0.ffn"].tolist() == [True, False, False]
    assert gates.overruled(decided) == (0, 5)  # 2 heads and 3 neurons; the sublayer is no unit
    chosen = {name: mask.clone() for name, mask in decided.items()}
    chosen["text.0.ffn"][:2] = torch.tensor([False, True])  # one dropped, one kept: 2 against
    assert gates.overruled(chosen) == (2, 5)
    chosen["vision.0.attn_layer"][0] = False  # dropping the sublayer drops both heads under it
    assert gates.overruled(chosen) == (4, 5)


def test_the_quadratic_penalty_adds_a_fixed_weight_to_lambda_2():
    gates = L0Gates(tiny_groups())
    constraint = SparsityConstraint(gates, "modal-adaptive", 0.5, quadratic_penalty=300.0)
    lagrangian = constraint.lagrangians["global"]
    with torch.no_grad():
        lagrangian.lambda_1.fill_(2.0)
        lagrangian.lambda_2.fill_(3.0)
    penalty = lagrangian.penalty(torch.tensor(0.6), 0.5)
    assert penalty.item() == pytest.approx(2.0 * 0.1 + (3.0 + 300.0) * 0.01)
    penalty.backward()  # the multipliers' gradients are the gap and its square, as without rho
    assert lagrangian.lambda_1.grad.item() == pytest.approx(0.1)
    assert lagrangian.lambda_2.grad.item() == pytest.approx(0.01)
    assert list(constraint.parameters()) == [lagrangian.lambda_1, lagrangian.lambda_2]


@pytest.mark.parametrize("pull", [0.0, 3.0])
def test_the_quadratic_penalty_stops_the_sparsity_at_the_target(pull):
    """Gates under the ramped target and a task that wants every unit kept (`pull`): lambda_1
    winds up while the gates lag the ramp, and CoFi's penalty (rho 0) carries the sparsity far
    past the target before it comes back; rho 300 holds it within 0.01 all along."""
    peaks = {}
    for rho in (0.0, 300.0):
        torch.manual_seed(0)
        gates = L0Gates(two_encoder_groups(), init="heads_kept")
        constraint = SparsityConstraint(gates, "modal-adaptive", 0.5, warmup_fraction=0.5,
                                        quadratic_penalty=rho)
        optimizers = [torch.optim.Adam(gates.parameters(), lr=0.1),
                      constraint.ascent_optimizer(0.1)]
        trajectory = []
        for step in range(300):
            keep = -pull * (1 - gates.expected_sparsity())
            step_all(optimizers, constraint.loss(step, 300) + keep, gates)
            trajectory.append(gates.expected_sparsity().item())
        peaks[rho] = max(trajectory)
        assert trajectory[-1] == pytest.approx(0.5, abs=0.01)
    assert peaks[0.0] > 0.6 and peaks[300.0] < 0.51
