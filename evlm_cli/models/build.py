"""Building the teacher from its typed config: from scratch, from pretrained parts, or imported."""

from __future__ import annotations

import torch
from torch import Tensor

from evlm_cli.config import TeacherConfig
from evlm_cli.errors import CheckpointError
from evlm_cli.models.checkpoint import check_state, load_model, read_weights
from evlm_cli.models.config import VLMConfig, make_config
from evlm_cli.models.importers import import_hf_bert, import_timm_vit, import_xvlm, load_hf_bert_dir
from evlm_cli.models.vlm import VLM


def teacher_config(t: TeacherConfig, *, task: str, image_size: int, vocab_size: int,
                   max_positions: int, num_answers: int) -> VLMConfig:
    shape = lambda e: {"layers": e.layers, "width": e.width, "heads": e.heads, "ffn": e.ffn,  # noqa: E731
                       "norm": e.norm}
    return make_config(vision=shape(t.vision), text=shape(t.text), fusion=shape(t.fusion),
                       image_size=image_size, patch_size=t.vision.patch_size, stem=t.vision.stem,
                       vocab_size=vocab_size, max_positions=max_positions, heads=[task],
                       num_answers=num_answers, pool=t.pool)


def _load_partial(model: VLM, state: dict[str, Tensor], source: str) -> None:
    check_state(model, state, source, strict=False)
    unknown = [k for k in state if k not in model.state_dict()]
    if unknown:
        raise CheckpointError(f"{source}: tensor {unknown[0]!r} has no place in the model")
    model.load_state_dict(state, strict=False)


def build_teacher(t: TeacherConfig, *, task: str, seed: int, image_size: int, vocab_size: int,
                  max_text_len: int, num_answers: int) -> tuple[VLM, set[str]]:
    """The teacher before task training, and the names of the tensors that came pretrained."""
    if t.imports_finished_model:
        return load_model(t.checkpoint), set()
    torch.manual_seed(seed)
    hf_text = load_hf_bert_dir(t.init.text) if t.init.text else None
    # Pretrained position embeddings keep their length; otherwise the prepared text length.
    positions = hf_text[1]["max_position_embeddings"] if hf_text else max_text_len
    model = VLM(teacher_config(t, task=task, image_size=image_size, vocab_size=vocab_size,
                               max_positions=positions, num_answers=num_answers))
    loaded: set[str] = set()
    if t.checkpoint:  # X-VLM / EfficientVLM layout
        hf = dict(hidden_size=t.text.width, num_attention_heads=t.text.heads,
                  intermediate_size=t.text.ffn, vocab_size=model.config.text.vocab_size,
                  max_position_embeddings=model.config.text.max_positions,
                  num_hidden_layers=t.text.layers)
        state, _ = import_xvlm(read_weights(t.checkpoint), t.vision.heads, hf,
                               image_size=image_size, source=str(t.checkpoint))
        # Pre-training heads (ITM, ITC) have no place in a task model; the task head is new.
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        _load_partial(model, state, str(t.checkpoint))
        return model, set(state)
    if hf_text:
        bert, hf = hf_text
        n_text, n_fusion, n_bert = t.text.layers, t.fusion.layers, hf["num_hidden_layers"]
        fusion_ids = None
        if t.init.fusion_from_text:
            # X-VLM starts its cross layers from the BERT layers above the text ones; when the
            # BERT is too shallow for that, from its top layers.
            first = n_text if n_text + n_fusion <= n_bert else max(0, n_bert - n_fusion)
            fusion_ids = list(range(first, first + n_fusion))
        state, _ = import_hf_bert(bert, hf, text_layers=n_text, fusion_layers=fusion_ids,
                                  source=t.init.text)
        _load_partial(model, state, t.init.text)
        loaded |= set(state)
    if t.init.vision:
        state, _ = import_timm_vit(read_weights(t.init.vision), t.vision.heads,
                                   image_size=image_size, source=str(t.init.vision))
        _load_partial(model, state, str(t.init.vision))
        loaded |= set(state)
    return model, loaded
