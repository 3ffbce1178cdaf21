"""A shallower student initialised from chosen teacher layers; embeddings and heads copied."""

from __future__ import annotations

import re

from evlm_cli.compress.distill import uniform_layer_map
from evlm_cli.models.config import ENCODERS
from evlm_cli.models.vlm import VLM

# Where each encoder's layers live in the state dict.
LAYER_PREFIX = {"vision": "vision.encoder.layers.", "text": "text.layers.", "fusion": "fusion.layers."}


def resolve_layer_map(teacher_layers: dict[str, int], student_layers: dict[str, int],
                      layer_map: dict[str, list[int] | None] | None = None) -> dict[str, list[int]]:
    """Student layer i of each encoder -> teacher layer; every other layer unless given."""
    layer_map = layer_map or {}
    out = {}
    for enc in ENCODERS:
        ids = layer_map.get(enc) or uniform_layer_map(student_layers[enc], teacher_layers[enc])
        if len(ids) != student_layers[enc] or not all(0 <= i < teacher_layers[enc] for i in ids):
            raise ValueError(f"layer map for {enc} must list {student_layers[enc]} teacher layers "
                             f"in [0, {teacher_layers[enc]}), got {ids}")
        out[enc] = list(ids)
    return out


def student_from_teacher(teacher: VLM, student_layers: dict[str, int],
                         layer_map: dict[str, list[int] | None] | None = None
                         ) -> tuple[VLM, dict[str, list[int]]]:
    """Build the student and copy the mapped teacher layers' weights into it."""
    tcfg = teacher.config
    teacher_layers = {e: tcfg.encoder(e).layers for e in ENCODERS}
    mapping = resolve_layer_map(teacher_layers, student_layers, layer_map)
    scfg = tcfg.with_encoders(*(tcfg.encoder(e).select(mapping[e]) for e in ENCODERS))
    student = VLM(scfg)
    source = teacher.state_dict()
    pattern = re.compile("^(" + "|".join(re.escape(p) for p in LAYER_PREFIX.values()) + r")(\d+)\.")
    prefix_to_enc = {p: e for e, p in LAYER_PREFIX.items()}
    state = {}
    for key in student.state_dict():
        m = pattern.match(key)
        if m:
            enc = prefix_to_enc[m.group(1)]
            key_t = f"{m.group(1)}{mapping[enc][int(m.group(2))]}.{key[m.end():]}"
        else:
            key_t = key
        state[key] = source[key_t].clone()
    student.load_state_dict(state)
    return student, mapping

