"""Building the teacher from its typed config: from scratch, from pretrained parts, or imported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from evlm_cli.core.config import TeacherConfig
from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.checkpoint import check_state, load_model, read_weights
from evlm_cli.models.config import EncoderConfig, VisionConfig, VLMConfig, make_config
from evlm_cli.models.importers import (
    clip_vision_settings,
    import_clip_vit,
    import_hf_bert,
    import_timm_swin,
    import_vit,
    import_xvlm,
    load_hf_dir,
)
from evlm_cli.models.vlm import VLM, with_heads


def teacher_config(t: TeacherConfig, *, heads: list[str], image_size: int, vocab_size: int,
                   max_positions: int, num_answers: int = 0,
                   imported: dict[str, EncoderConfig] | None = None,
                   vision_layout: VisionConfig | None = None) -> VLMConfig:
    """The teacher's config from the spec, and from the checkpoints it imports what the spec
    does not say: an encoder in `imported` (by name) takes its LayerNorm eps and activation from
    there (teacher.vision.activation, where set, wins); `vision_layout`, an imported ViT's, gives
    the stem's bias, CLIP's pre-norm and its source's position resampling."""
    imported = imported or {}

    def shape(name, e):
        numerics = {"eps": imported[name].eps, "act": imported[name].act} if name in imported else {}
        if e.activation is not None:
            numerics["act"] = e.activation
        if e.kind == "swin":  # vision only
            numerics.update(kind="swin", depths=list(e.depths or []), window_size=e.window_size)
        return {"layers": e.layers, "width": e.width, "heads": e.heads, "ffn": e.ffn, "norm": e.norm,
                **numerics}

    cfg = make_config(vision=shape("vision", t.vision), text=shape("text", t.text),
                      fusion=shape("fusion", t.fusion), image_size=image_size,
                      patch_size=t.vision.patch_size, stem=t.vision.stem,
                      pos_init=t.vision.pos_init, vocab_size=vocab_size,
                      max_positions=max_positions, heads=list(heads), num_answers=num_answers,
                      embed_dim=t.embed_dim, pool=t.pool, itm_head=t.itm_head)
    if vision_layout is not None:
        cfg.vision = replace(cfg.vision, patch_bias=vision_layout.patch_bias,
                             pre_norm=vision_layout.pre_norm,
                             pos_resample=vision_layout.pos_resample)
    return cfg


def import_vision_init(path: str, heads: int, image_size: int, act: str | None
                       ) -> tuple[dict[str, Tensor], VisionConfig]:
    """teacher.init.vision: a transformers CLIP directory, whose config gives the heads, eps and
    activation, or a weights file in timm's or CLIP's naming (`import_vit`). `act` None = as
    the source says."""
    if not Path(path).is_dir():
        return import_vit(read_weights(path), heads, image_size, act=act, source=str(path))
    state, hf_config = load_hf_dir(path)
    settings = clip_vision_settings(hf_config, str(path))
    if settings["num_heads"] != heads:
        raise CheckpointError(f"{path}: its vision tower has {settings['num_heads']} attention "
                              f"heads, teacher.vision.heads {heads}")
    return import_clip_vit(state, heads, image_size, eps=settings["eps"],
                           act=act or settings["act"], source=str(path))


def require_vision_kind(t: TeacherConfig, layout: VisionConfig, source: str) -> None:
    """An imported vision encoder must be the kind the spec builds: a ViT, or a Swin with the
    spec's stages and window."""
    kind = t.vision.kind or "vit"
    if layout.kind != kind:
        raise CheckpointError(f"{source}: its vision encoder is a {layout.kind}, "
                              f"teacher.vision.kind {kind}")
    if layout.swin is not None:
        theirs = (layout.swin.depths, layout.swin.window_size)
        if theirs != (list(t.vision.depths or []), t.vision.window_size):
            raise CheckpointError(f"{source}: its Swin has stages {theirs[0]} and windows of "
                                  f"{theirs[1]}, teacher.vision depths {list(t.vision.depths or [])} "
                                  f"and window_size {t.vision.window_size}")


def require_vocabulary(model: VLM, vocab_size: int, source: str, tokenizer: str,
                       hint: str = "") -> None:
    """An imported model's text embeddings must index the tokenizer the data was prepared with."""
    if model.config.text.vocab_size != vocab_size:
        raise CheckpointError(f"{source}: its vocabulary has {model.config.text.vocab_size} "
                              f"tokens, {tokenizer} {vocab_size}{hint}")


def _load_partial(model: VLM, state: dict[str, Tensor], source: str) -> None:
    check_state(model, state, source, strict=False)
    unknown = [k for k in state if k not in model.state_dict()]
    if unknown:
        raise CheckpointError(f"{source}: tensor {unknown[0]!r} has no place in the model")
    model.load_state_dict(state, strict=False)


def build_teacher(t: TeacherConfig, *, heads: list[str], seed: int, image_size: int,
                  vocab_size: int, max_text_len: int, num_answers: int = 0) -> tuple[VLM, set[str]]:
    """The teacher with `heads` before (pre-)training, and the names of the tensors that came
    pretrained.

    Checkpoints are imported before the model is built, so that its config takes each imported
    encoder's eps and activation from the checkpoint rather than from defaults.
    """
    if t.checkpoint and t.checkpoint_format == "evlm":  # an evlm teacher: its encoders imported
        source = load_model(t.checkpoint)
        require_vocabulary(source, vocab_size, str(t.checkpoint), "the pairs' tokenizer",
                           ": prepare the pairs with its tokenizer")
        torch.manual_seed(seed)  # heads it lacks start fresh, seeded
        model = with_heads(source, heads, num_answers=num_answers)
        kept = source.state_dict()
        return model, {k for k, v in model.state_dict().items()
                       if k in kept and torch.equal(kept[k], v)}
    positions = max_text_len  # the prepared text length, unless pretrained positions say otherwise
    states: list[tuple[dict[str, Tensor], str]] = []  # (our tensors, where they came from)
    imported: dict[str, EncoderConfig] = {}
    vision_layout = None
    if t.checkpoint:  # X-VLM / EfficientVLM layout
        hf = dict(hidden_size=t.text.width, num_attention_heads=t.text.heads,
                  intermediate_size=t.text.ffn, vocab_size=vocab_size,
                  max_position_embeddings=positions, num_hidden_layers=t.text.layers)
        state, parts = import_xvlm(read_weights(t.checkpoint), t.vision.heads, hf,
                                   image_size=image_size, source=str(t.checkpoint),
                                   vision_act=t.vision.activation)
        positions = parts["text"].max_positions  # the checkpoint's table, kept whole
        imported = {"vision": parts["vision"].encoder, "text": parts["text"].encoder,
                    "fusion": parts["fusion"]}
        vision_layout = parts["vision"]
        require_vision_kind(t, vision_layout, str(t.checkpoint))
        states.append((state, str(t.checkpoint)))
    else:
        if t.init.text:
            bert, hf = load_hf_dir(t.init.text)
            positions = hf["max_position_embeddings"]  # pretrained positions keep their length
            n_text, n_fusion, n_bert = t.text.layers, t.fusion.layers, hf["num_hidden_layers"]
            fusion_ids = None
            if t.init.fusion_from_text:
                # X-VLM starts its cross layers from the BERT layers above the text ones; when
                # the BERT is too shallow for that, from its top layers.
                first = n_text if n_text + n_fusion <= n_bert else max(0, n_bert - n_fusion)
                fusion_ids = list(range(first, first + n_fusion))
            state, tcfg = import_hf_bert(bert, hf, text_layers=n_text, fusion_layers=fusion_ids,
                                         source=t.init.text)
            imported["text"] = tcfg.encoder
            if fusion_ids:
                imported["fusion"] = tcfg.encoder
            states.append((state, t.init.text))
        if t.init.vision:
            if t.vision.kind == "swin":  # a timm Swin (or Microsoft's names): heads in its weights
                state, vcfg = import_timm_swin(read_weights(t.init.vision), image_size,
                                               source=str(t.init.vision))
            else:
                state, vcfg = import_vision_init(t.init.vision, t.vision.heads, image_size,
                                                 t.vision.activation)
            imported["vision"], vision_layout = vcfg.encoder, vcfg
            require_vision_kind(t, vcfg, str(t.init.vision))
            states.append((state, str(t.init.vision)))
    if positions < max_text_len:
        source = t.checkpoint or t.init.text
        raise CheckpointError(f"{source}: has {positions} text positions, the pairs "
                              f"{max_text_len} (pairs.max_text_len)")
    torch.manual_seed(seed)
    model = VLM(teacher_config(t, heads=heads, image_size=image_size, vocab_size=vocab_size,
                               max_positions=positions, num_answers=num_answers,
                               imported=imported, vision_layout=vision_layout))
    own = model.state_dict()
    loaded: set[str] = set()
    for state, source in states:
        if t.checkpoint:
            # X-VLM's heads that `heads` leaves out have no place in this model.
            state = {k: v for k, v in state.items() if k in own}
        _load_partial(model, state, source)
        loaded |= set(state)
    return model, loaded


def import_xvlm_task_teacher(checkpoint: str, like: VLMConfig, *, heads: list[str],
                             num_answers: int, image_size: int) -> VLM:
    """A task teacher X-VLM fine-tuned (retrieval, NLVR2), imported finished: every tensor of
    the model comes from the checkpoint, the task's heads included. What the weights do not
    say (the vision heads and activation, the ITC width, the pool) is the pre-trained
    teacher's, `like`; so is the depth (NLVR2's fusion paired), since the student's layer
    maps point into it."""
    t = like.text.encoder
    hf = dict(hidden_size=t.width, num_attention_heads=t.heads[0], intermediate_size=t.ffn[0],
              vocab_size=like.text.vocab_size, max_position_embeddings=like.text.max_positions,
              num_hidden_layers=t.layers)
    state, parts = import_xvlm(read_weights(checkpoint), like.vision.encoder.heads[0], hf,
                               image_size=image_size, source=checkpoint,
                               vision_act=like.vision.encoder.act)
    expected = like.fusion.layers * (2 if "nlvr2" in heads else 1)
    depths = {"vision": (parts["vision"].encoder.layers, like.vision.encoder.layers),
              "text": (parts["text"].encoder.layers, t.layers),
              "fusion": (parts["fusion"].layers, expected)}
    for encoder, (found, wanted) in depths.items():
        if found != wanted:
            raise CheckpointError(f"{checkpoint}: has {found} {encoder} layers, the pre-trained "
                                  f"teacher's layer maps need {wanted}")
    cfg = VLMConfig(vision=parts["vision"], text=parts["text"], fusion=parts["fusion"],
                    heads=list(heads), num_answers=num_answers, embed_dim=like.embed_dim,
                    pool=like.pool)
    model = VLM(cfg)
    own = model.state_dict()
    lacking = sorted({k.split(".")[1] for k in own if k.startswith("heads.") and k not in state})
    if lacking:
        raise CheckpointError(f"{checkpoint}: has no {lacking[0]} head, so it cannot be the "
                              "task teacher")
    # The importer accounted for every tensor; heads the task does not use stay behind.
    state = {k: v for k, v in state.items() if k in own or not k.startswith("heads.")}
    check_state(model, state, checkpoint)
    model.load_state_dict(state)
    return model
