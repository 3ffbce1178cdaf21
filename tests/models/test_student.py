"""Student initialisation: the student holds exactly the mapped teacher layers' weights."""

import pytest
import torch

from evlm_cli.models.config import make_config
from evlm_cli.models.student import paired_layer_map, student_from_teacher
from evlm_cli.models.vlm import VLM


def teacher_12_6_6() -> VLM:
    torch.manual_seed(0)
    cfg = make_config(vision=dict(layers=12, width=16, heads=2, ffn=32),
                      text=dict(layers=6, width=16, heads=2, ffn=32),
                      fusion=dict(layers=6, width=16, heads=2, ffn=32), image_size=16,
                      patch_size=8, vocab_size=30, max_positions=8, heads=["vqa", "itm"],
                      num_answers=4)
    return VLM(cfg)


def test_6_3_3_student_holds_the_mapped_teacher_layers():
    teacher = teacher_12_6_6()
    student, mapping = student_from_teacher(teacher, {"vision": 6, "text": 3, "fusion": 3})
    assert mapping == {"vision": [1, 3, 5, 7, 9, 11], "text": [1, 3, 5], "fusion": [1, 3, 5]}
    pairs = [(student.vision.encoder.layers, teacher.vision.encoder.layers, "vision"),
             (student.text.layers, teacher.text.layers, "text"),
             (student.fusion.layers, teacher.fusion.layers, "fusion")]
    for s_layers, t_layers, enc in pairs:
        assert len(s_layers) == len(mapping[enc])
        for i, layer in enumerate(s_layers):
            t_state = t_layers[mapping[enc][i]].state_dict()
            for k, v in layer.state_dict().items():
                assert torch.equal(v, t_state[k]), f"{enc} layer {i}: {k}"
            # and it is not the neighbouring teacher layer
            other = t_layers[mapping[enc][i] - 1].state_dict()
            assert not torch.equal(layer.mlp.fc1.weight, other["mlp.fc1.weight"])
    for name in ("embeddings.word.weight", "vision.pos_embed", "heads.vqa.3.weight", "heads.itm.3.bias"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    assert student.config.vision.encoder.layers == 6 and student.config.fusion.layers == 3


def test_explicit_layer_map_and_bad_maps():
    teacher = teacher_12_6_6()
    student, mapping = student_from_teacher(
        teacher, {"vision": 2, "text": 1, "fusion": 1}, {"vision": [0, 11], "text": [2], "fusion": None})
    assert mapping["vision"] == [0, 11] and mapping["fusion"] == [5]
    assert torch.equal(student.vision.encoder.layers[0].attn.q.weight,
                       teacher.vision.encoder.layers[0].attn.q.weight)
    with pytest.raises(ValueError, match="layer map for text"):
        student_from_teacher(teacher, {"vision": 2, "text": 1, "fusion": 1}, {"text": [6]})


def test_paired_fusion_layers_imitate_the_teachers_copy_for_the_same_image():
    """NLVR2 pairs the fusion layers of student and teacher alike (X-VLM's `model_nlvr.py`):
    student layer 2i + s imitates teacher layer 2 m(i) + s."""
    assert paired_layer_map([1, 3, 5]) == [2, 3, 6, 7, 10, 11]
    assert paired_layer_map([]) == []
