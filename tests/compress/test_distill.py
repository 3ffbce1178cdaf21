"""Distillation losses: logits KD, layer maps, hidden-state and attention-map MSE."""

import pytest
import torch
import torch.nn.functional as F

from evlm_cli.compress.distill import HiddenDistiller, attention_kd, logits_kd
from evlm_cli.models.student import resolve_layer_map, uniform_layer_map


def test_logits_kd_zero_for_equal_logits_positive_otherwise():
    torch.manual_seed(0)
    logits = torch.randn(4, 7)
    assert logits_kd(logits, logits.clone(), 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert logits_kd(torch.randn(4, 7), logits, 2.0).item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logits_kd_matches_hand_computation(temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 3), torch.randn(5, 3)
    p_teacher = F.softmax(teacher / temperature, -1)
    log_p_student = F.log_softmax(student / temperature, -1)
    per_row = (p_teacher * (p_teacher.log() - log_p_student)).sum(-1)
    expected = per_row.mean() * temperature**2
    assert logits_kd(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_logits_kd_flattens_token_dimensions_and_checks_shapes():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    flat = logits_kd(student.reshape(6, 5), teacher.reshape(6, 5), 2.0)
    assert logits_kd(student, teacher, 2.0).item() == pytest.approx(flat.item())
    with pytest.raises(ValueError, match="shapes differ"):
        logits_kd(torch.randn(2, 5), torch.randn(2, 4))


def test_uniform_layer_map_takes_last_layer_of_each_block():
    assert uniform_layer_map(3, 6) == [1, 3, 5]
    assert uniform_layer_map(6, 12) == [1, 3, 5, 7, 9, 11]
    assert uniform_layer_map(4, 4) == [0, 1, 2, 3]
    assert uniform_layer_map(1, 6) == [5]
    with pytest.raises(ValueError):
        uniform_layer_map(7, 6)


def test_explicit_layer_maps_are_checked():
    assert resolve_layer_map([0, 2, 4], 3, 6) == [0, 2, 4]
    assert resolve_layer_map(None, 3, 6) == [1, 3, 5]
    with pytest.raises(ValueError):
        resolve_layer_map([0, 6, 2], 3, 6)
    with pytest.raises(ValueError):
        resolve_layer_map([0, 1], 3, 6)


def test_hidden_loss_trains_a_width_changing_projection():
    torch.manual_seed(3)
    distiller = HiddenDistiller({"text": (8, 12), "vision": (12, 12)})
    student = [torch.randn(2, 5, 8, requires_grad=True) for _ in range(2)]
    teacher = [torch.randn(2, 5, 12) for _ in range(4)]
    loss = distiller.loss(student, teacher, [1, 3], encoder="text")
    loss.backward()
    projection = distiller.projections["text"]
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert student[0].grad.abs().sum() > 0
    expected = (F.mse_loss(projection(student[0]), teacher[1])
                + F.mse_loss(projection(student[1]), teacher[3])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert isinstance(distiller.projections["vision"], torch.nn.Identity)


def test_hidden_loss_ignores_padding_and_skips_embeddings():
    distiller = HiddenDistiller({"text": (4, 4)})
    teacher = [torch.full((1, 3, 4), 9.0), torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)]
    student = [torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)]
    student[1][0, 2] = 100.0  # a padded token: must not count
    mask = torch.tensor([[1, 1, 0]])
    # Lists start with the embeddings (teacher's differ wildly); layer 0 -> teacher layer 1.
    assert distiller.loss(student, teacher, [1], mask).item() == 0.0
    assert distiller.loss(student, teacher, [1]).item() > 0


def attention(batch, heads, queries, keys, seed):
    torch.manual_seed(seed)
    return torch.randn(batch, heads, queries, keys).softmax(-1)


def test_attention_kd_per_head_when_head_counts_match():
    student, teacher = attention(2, 4, 3, 5, 0), attention(2, 4, 3, 5, 1)
    loss = attention_kd([student], [None, teacher], [1])
    assert loss.item() == pytest.approx(F.mse_loss(student, teacher).item(), rel=1e-6)
    assert attention_kd([teacher], [None, teacher], [1]).item() == 0.0


def test_attention_kd_head_averages_after_pruning():
    student, teacher = attention(2, 2, 3, 5, 2), attention(2, 4, 3, 5, 3)
    student.requires_grad_(True)
    loss = attention_kd([student, None], [teacher, teacher], [0, 1])
    expected = F.mse_loss(student.mean(1), teacher.mean(1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert student.grad.abs().sum() > 0
    # With equal head counts a head permutation is a mismatch; with fewer heads only the
    # average counts, so a student reproducing the teacher's average map scores 0.
    assert attention_kd([teacher[:, [1, 0, 3, 2]]], [teacher], [0]).item() > 0
    averaged = teacher.mean(1, keepdim=True).expand(2, 3, 3, 5)
    assert attention_kd([averaged], [teacher], [0]).item() == pytest.approx(0.0, abs=1e-9)


def test_attention_kd_leaves_padded_queries_out():
    student, teacher = attention(1, 2, 3, 4, 4), attention(1, 2, 3, 4, 5)
    student[:, :, :2] = teacher[:, :, :2]  # only the last (padded) query row differs
    assert attention_kd([student], [teacher], [0], torch.tensor([[1, 1, 0]])).item() == 0.0
    assert attention_kd([student], [teacher], [0]).item() > 0
