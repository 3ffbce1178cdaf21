"""The stages' objective: its distillation terms see real tokens only, never padding."""

import torch

from evlm_cli.compress.objective import Objective
from evlm_cli.config import LossWeights
from evlm_cli.models.config import make_config
from evlm_cli.models.student import student_from_teacher
from evlm_cli.models.vlm import VLM


def models():
    torch.manual_seed(0)
    cfg = make_config(vision=dict(layers=2, width=16, heads=2, ffn=32),
                      text=dict(layers=2, width=16, heads=2, ffn=32),
                      fusion=dict(layers=2, width=16, heads=2, ffn=32), image_size=16,
                      patch_size=8, vocab_size=30, max_positions=8, heads=["vqa"], num_answers=4)
    teacher = VLM(cfg).eval()
    student, maps = student_from_teacher(teacher, {"vision": 1, "text": 1, "fusion": 1})
    # a student that differs from its teacher, so every term is non-zero
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return teacher, student.eval(), maps


def batch(pad_token: int):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    ids = torch.tensor([[2, 5, 3, 0, 0], [2, 6, 7, 8, 3]])
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad_token))
    torch.manual_seed(1)
    return {"images": torch.randn(2, 3, 16, 16), "input_ids": ids, "attention_mask": mask,
            "targets": torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])}


def test_padding_changes_no_distillation_term():
    teacher, student, maps = models()
    objective = Objective(student, "vqa", LossWeights(task=1.0, logits=1.0, hidden=1.0, attention=1.0),
                          2.0, teacher, maps)
    with torch.no_grad():
        _, clean = objective(batch(pad_token=0), 0, 1)
        _, noisy = objective(batch(pad_token=17), 0, 1)  # other ids under the padding
    assert clean["attention"] > 0 and clean["hidden"] > 0
    for term in ("task", "logits", "hidden", "attention"):
        assert abs(clean[term] - noisy[term]) < 1e-6, term
