"""A shallower student initialised from chosen teacher layers; embeddings and heads copied."""

from __future__ import annotations

import re
from collections.abc import Sequence

from evlm_cli.models.config import ENCODERS
from evlm_cli.models.vlm import LAYER_PREFIX, VLM


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Student layer i -> the LAST teacher layer of the i-th of n_student equal blocks.

    3 of 6 -> [1, 3, 5]: each student layer imitates the output of the block of teacher layers
    it replaces, and the last student layer always matches the teacher's last layer.
    """
    if not 0 <= n_student <= n_teacher:
        raise ValueError(f"cannot map {n_student} student layers onto {n_teacher} teacher layers")
    return [(i + 1) * n_teacher // n_student - 1 for i in range(n_student)]


def paired_layer_map(layer_map: Sequence[int]) -> list[int]:
    """A fusion layer map for models whose fusion layers come in pairs, one per image (NLVR2,
    `vlm.paired_fusion`): student layer 2i + s imitates teacher layer 2 layer_map[i] + s, the
    copy that reads the same image."""
    return [2 * j + side for j in layer_map for side in (0, 1)]


def resolve_layer_map(layer_map: Sequence[int] | None, n_student: int, n_teacher: int
                      ) -> list[int]:
    """An explicit map checked against the layer counts, or the uniform one when None."""
    if layer_map is None:
        return uniform_layer_map(n_student, n_teacher)
    layer_map = [int(i) for i in layer_map]
    if len(layer_map) != n_student or not all(0 <= i < n_teacher for i in layer_map):
        raise ValueError(f"layer map must list {n_student} teacher layers in [0, {n_teacher}), "
                         f"got {layer_map}")
    return layer_map


def student_from_teacher(teacher: VLM, student_layers: dict[str, int],
                         layer_map: dict[str, Sequence[int] | None] | None = None
                         ) -> tuple[VLM, dict[str, list[int]]]:
    """Build the student and copy the mapped teacher layers' weights into it."""
    tcfg = teacher.config
    given = layer_map or {}
    mapping = {}
    for e in ENCODERS:
        try:
            mapping[e] = resolve_layer_map(given.get(e), student_layers[e], tcfg.encoder(e).layers)
        except ValueError as error:
            raise ValueError(f"layer map for {e}: {error}") from None
    stages = None
    if tcfg.vision.swin is not None:  # a Swin student keeps each layer in its stage
        try:
            stages = tcfg.vision.swin.select(mapping["vision"])
        except ValueError as error:
            raise ValueError(f"layer map for vision: {error}") from None
    scfg = tcfg.with_encoders(*(tcfg.encoder(e).select(mapping[e]) for e in ENCODERS), swin=stages)
    student = VLM(scfg)
    source = teacher.state_dict()
    pattern = re.compile("^(" + "|".join(re.escape(p) for p in LAYER_PREFIX.values()) + r")\.(\d+)\.")
    prefix_to_enc = {p: e for e, p in LAYER_PREFIX.items()}
    state = {}
    for key in student.state_dict():
        m = pattern.match(key)
        if m:
            enc = prefix_to_enc[m.group(1)]
            key_t = f"{m.group(1)}.{mapping[enc][int(m.group(2))]}.{key[m.end():]}"
        else:
            key_t = key
        state[key] = source[key_t].clone()
    student.load_state_dict(state)
    return student, mapping
