"""Importers for foreign checkpoints: pure functions from a state dict to ours plus a config.

Each maps keys one by one and splits fused tensors; loading and shape checks live elsewhere
(`checkpoint.check_state`), so these stay testable on any state dict. Every tensor of the source
is accounted for: mapped, named below as known and deliberately unused, or refused with a
`CheckpointError`, so that a checkpoint with a feature our model lacks cannot load cleanly and
compute something else.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor

from evlm_cli.core.errors import CheckpointError
from evlm_cli.models.checkpoint import read_weights
from evlm_cli.models.config import EncoderConfig, SwinConfig, TextConfig, VisionConfig
from evlm_cli.models.swin import layer_geometry, relative_position_index, shift_mask
from evlm_cli.models.vlm import LAYER_PREFIX, resample_pos_embed

State = dict[str, Tensor]

_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "quick_gelu": "quick_gelu"}

# Known tensors that are deliberately not imported (regexes over the key, after the BERT prefix).
_BERT_UNUSED = (
    r"embeddings\.(position_ids|token_type_ids)",  # index buffers older transformers saved
    r"pooler\.dense\.(weight|bias)",  # tanh pooler over [CLS]; our heads read the fused tokens
)
# Beside the BERT prefix ("bert.", "text_encoder.bert."): BertForPreTraining's MLM and NSP
# heads. They read the text encoder's output, which no head of ours does.
_BERT_HEADS_UNUSED = r"cls\..*"
# The ImageNet classifier (or CLIP's projection) of a timm ViT: our heads are built per task.
_TIMM_UNUSED = (r"head\.(weight|bias)",)
# X-VLM's heads, each its `build_mlp` (Linear, LayerNorm, GELU, Linear: indices 0, 1, 3), as
# ours: ITM (pre-training, retrieval) and NLVR2's classifier.
_XVLM_HEADS = {"itm_head": "heads.itm", "cls_head": "heads.nlvr2"}
# The one X-VLM head no task of evlm computes with: the box head of grounding.
_XVLM_UNUSED = (r"bbox_head\.[013]\.(weight|bias)",)

# timm ViT features that change what a block computes and that our blocks lack: refused by name.
_TIMM_UNSUPPORTED = {
    r"blocks\.\d+\.attn\.[qk]_norm\..*": "qk_norm (attn.q_norm/k_norm)",
    r"reg_token": "register tokens (reg_token)",
}


class _Source:
    """A foreign state dict that records which tensors were taken or knowingly skipped, so that
    whatever is left over is refused instead of dropped."""

    def __init__(self, state: State, name: str):
        self.state, self.name, self.used = state, name, set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def take(self, key: str) -> Tensor:
        if key not in self.state:
            raise CheckpointError(f"{self.name}: missing tensor {key!r}")
        self.used.add(key)
        return self.state[key]

    def skip(self, prefix: str, patterns: tuple[str, ...] | list[str]) -> None:
        """Mark the tensors `prefix` + any of `patterns` (full-match regexes) as deliberately unused."""
        rx = re.compile(f"{re.escape(prefix)}(?:{'|'.join(patterns)})")
        self.used.update(k for k in self.state if rx.fullmatch(k))

    def refuse_leftovers(self, within: str = "") -> None:
        left = [k for k in self.state if k.startswith(within) and k not in self.used]
        if left:
            more = f" (and {len(left) - 1} more)" if len(left) > 1 else ""
            raise CheckpointError(f"{self.name}: unexpected tensor {left[0]!r}{more}: "
                                  "the importer has no place for it")


def _layer_ids(state: State, prefix: str) -> list[int]:
    rx = re.compile(rf"{re.escape(prefix)}(\d+)\.")
    return sorted({int(m.group(1)) for k in state if (m := rx.match(k))})


# --- HF BERT -------------------------------------------------------------------------------

def _bert_layer(src: _Source, hf: str, dst: str, cross: bool = False) -> State:
    """One HF BertLayer (`hf` = "...encoder.layer.{i}") as one of our post-norm Blocks."""
    g = lambda k: src.take(f"{hf}.{k}")  # noqa: E731
    out = {}

    def attention(theirs: str, ours: str, norm: str):
        for proj, name in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{dst}.{ours}.{name}.weight"] = g(f"{theirs}.self.{proj}.weight")
            out[f"{dst}.{ours}.{name}.bias"] = g(f"{theirs}.self.{proj}.bias")
        out[f"{dst}.{ours}.out.weight"] = g(f"{theirs}.output.dense.weight")
        out[f"{dst}.{ours}.out_bias"] = g(f"{theirs}.output.dense.bias")
        out[f"{dst}.{norm}.weight"] = g(f"{theirs}.output.LayerNorm.weight")
        out[f"{dst}.{norm}.bias"] = g(f"{theirs}.output.LayerNorm.bias")

    attention("attention", "attn", "norm1")
    if cross:
        attention("crossattention", "cross", "norm_cross")
    out[f"{dst}.mlp.fc1.weight"] = g("intermediate.dense.weight")
    out[f"{dst}.mlp.fc1.bias"] = g("intermediate.dense.bias")
    out[f"{dst}.mlp.fc2.weight"] = g("output.dense.weight")
    out[f"{dst}.mlp.fc2_bias"] = g("output.dense.bias")
    out[f"{dst}.norm2.weight"] = g("output.LayerNorm.weight")
    out[f"{dst}.norm2.bias"] = g("output.LayerNorm.bias")
    return out


def _bert_prefix(state: State) -> str:
    for prefix in ("", "bert.", "text_encoder.bert.", "text_encoder."):
        if f"{prefix}embeddings.word_embeddings.weight" in state:
            return prefix
    raise CheckpointError("no BERT embeddings found (expected a key ending in "
                          "'embeddings.word_embeddings.weight')")


def bert_text_config(hf_config: dict, layers: int | None = None,
                     source: str = "BERT config") -> TextConfig:
    """Our text config from an HF BERT config.json: its shape, and its own eps and activation.

    Settings that change what BERT computes and that our encoder lacks are refused by name.
    """
    model_type = hf_config.get("model_type", "bert")
    if model_type != "bert":  # RoBERTa & co. share BERT's keys but offset positions
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported (only 'bert')")
    positions = hf_config.get("position_embedding_type") or "absolute"
    if positions != "absolute":
        raise CheckpointError(f"{source}: position_embedding_type {positions!r} is not supported "
                              "(only 'absolute')")
    hidden_act = hf_config.get("hidden_act", "gelu")
    if hidden_act not in _HF_ACT:
        raise CheckpointError(f"{source}: hidden_act {hidden_act!r} is not supported "
                              f"(supported: {', '.join(_HF_ACT)})")
    heads, width = hf_config["num_attention_heads"], hf_config["hidden_size"]
    n = layers if layers is not None else hf_config["num_hidden_layers"]
    enc = EncoderConfig(width=width, head_dim=width // heads, heads=[heads] * n,
                        ffn=[hf_config["intermediate_size"]] * n, norm="post",
                        act=_HF_ACT[hidden_act], eps=hf_config.get("layer_norm_eps", 1e-12))
    return TextConfig(encoder=enc, vocab_size=hf_config["vocab_size"],
                      max_positions=hf_config["max_position_embeddings"],
                      type_vocab_size=hf_config.get("type_vocab_size", 2),
                      pad_id=hf_config.get("pad_token_id", 0) or 0)


def _bert(src: _Source, prefix: str, cfg: TextConfig, fusion_layers: list[int]) -> State:
    """Embeddings, the first text layers and the layers that initialise fusion layers."""
    e = f"{prefix}embeddings"
    out = {
        "embeddings.word.weight": src.take(f"{e}.word_embeddings.weight"),
        "embeddings.position.weight": src.take(f"{e}.position_embeddings.weight"),
        "embeddings.token_type.weight": src.take(f"{e}.token_type_embeddings.weight"),
        "embeddings.norm.weight": src.take(f"{e}.LayerNorm.weight"),
        "embeddings.norm.bias": src.take(f"{e}.LayerNorm.bias"),
    }
    for i in range(cfg.encoder.layers):
        out.update(_bert_layer(src, f"{prefix}encoder.layer.{i}", f"{LAYER_PREFIX['text']}.{i}"))
    for j, i in enumerate(fusion_layers):
        out.update(_bert_layer(src, f"{prefix}encoder.layer.{i}", f"{LAYER_PREFIX['fusion']}.{j}"))
    src.skip(prefix, _BERT_UNUSED)
    return out


def import_hf_bert(state: State, hf_config: dict, text_layers: int | None = None,
                   fusion_layers: list[int] | None = None,
                   source: str = "BERT checkpoint") -> tuple[State, TextConfig]:
    """HF BERT -> our text embeddings + text encoder (its first `text_layers` layers).

    `fusion_layers` optionally names BERT layers whose self-attention and FFN initialise our
    fusion layers 0, 1, ..., as X-VLM initialises its cross layers from BERT's upper layers.
    The BERT layers chosen for neither are skipped by design; any other tensor that is not
    imported must be named in `_BERT_UNUSED` or `_BERT_HEADS_UNUSED`, or the import is refused.
    """
    src = _Source(state, source)
    p = _bert_prefix(state)
    cfg = bert_text_config(hf_config, text_layers, source)
    out = _bert(src, p, cfg, fusion_layers or [])
    chosen = set(range(cfg.encoder.layers)) | set(fusion_layers or [])
    # Only the layers the config declares: a layer beyond them is a mismatch, not a choice.
    unchosen = [str(i) for i in range(hf_config["num_hidden_layers"]) if i not in chosen]
    if unchosen:
        src.skip(f"{p}encoder.layer.", [rf"(?:{'|'.join(unchosen)})\..*"])
    if p.endswith("bert."):
        src.skip(p[:-len("bert.")], [_BERT_HEADS_UNUSED])
    src.refuse_leftovers()
    return out, cfg


def load_hf_dir(directory: str | Path) -> tuple[State, dict]:
    """Read a transformers model directory (BERT, CLIP): config.json plus model.safetensors or
    pytorch_model.bin."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory}: not an HF model directory (no config.json)")
    try:
        hf_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: invalid JSON ({e})") from None
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_weights(directory / name), hf_config
    raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")


# --- timm / CLIP ViT -----------------------------------------------------------------------

def _layer_scaled(src: _Source, key: str, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a timm LayerScale (`key`, per-channel gamma on a sublayer's output) into the rows of
    that sublayer's output projection: the block computes the same without a parameter of its
    own, and pruning heads or neurons (columns) is unaffected."""
    if key not in src:
        return weight, bias
    gamma = src.take(key)
    return weight * gamma[:, None], bias * gamma


def _vit_config(*, width: int, num_heads: int, layers: int, ffn: int, act: str, eps: float,
                image_size: int, patch: int, channels: int, patch_bias: bool, pre_norm: bool,
                kernel: str) -> VisionConfig:
    enc = EncoderConfig(width=width, head_dim=width // num_heads, heads=[num_heads] * layers,
                        ffn=[ffn] * layers, norm="pre", act=act, eps=eps)
    return VisionConfig(encoder=enc, image_size=image_size, patch_size=patch, channels=channels,
                        patch_bias=patch_bias, pre_norm=pre_norm, pos_resample=kernel)


def _timm_vit(src: _Source, num_heads: int, image_size: int | None, eps: float | None, act: str,
              prefix: str, kernel: str) -> tuple[State, VisionConfig]:
    state, source = src.state, src.name
    for pattern, feature in _TIMM_UNSUPPORTED.items():
        rx = re.compile(re.escape(prefix) + pattern)
        if any(rx.fullmatch(k) for k in state):
            raise CheckpointError(f"{source}: timm ViT with {feature} is not supported")
    g = lambda k: src.take(f"{prefix}{k}")  # noqa: E731
    patch_w = g("patch_embed.proj.weight")
    width, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    pos = g("pos_embed")
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:  # e.g. timm's no_embed_class: no position for CLS
        raise CheckpointError(f"{source}: pos_embed has {pos.shape[1]} positions, not one for "
                              "the class token plus a square grid (timm no_embed_class is not supported)")
    image_size = image_size or grid * patch
    layer_ids = _layer_ids(state, f"{prefix}blocks.")
    if not layer_ids:
        raise CheckpointError(f"{source}: no 'blocks.N.*' tensors found")
    ffn = g("blocks.0.mlp.fc1.weight").shape[0]
    has_pre = f"{prefix}norm_pre.weight" in state
    # CLIP's towers (the ones with norm_pre) use LayerNorm eps 1e-5; timm's other ViTs 1e-6.
    eps = eps if eps is not None else (1e-5 if has_pre else 1e-6)
    cfg = _vit_config(width=width, num_heads=num_heads, layers=len(layer_ids), ffn=ffn, act=act,
                      eps=eps, image_size=image_size, patch=patch, channels=channels,
                      patch_bias=f"{prefix}patch_embed.proj.bias" in state, pre_norm=has_pre,
                      kernel=kernel)
    out = {"vision.stem.weight": patch_w, "vision.cls_token": g("cls_token"),
           "vision.pos_embed": resample_pos_embed(pos, image_size // patch, kernel),
           "vision.norm.weight": g("norm.weight"), "vision.norm.bias": g("norm.bias")}
    if cfg.patch_bias:
        out["vision.stem.bias"] = g("patch_embed.proj.bias")
    if has_pre:
        out["vision.norm_pre.weight"] = g("norm_pre.weight")
        out["vision.norm_pre.bias"] = g("norm_pre.bias")
    for i in layer_ids:
        s, dst = f"blocks.{i}", f"{LAYER_PREFIX['vision']}.{i}"
        qkv_w, qkv_b = g(f"{s}.attn.qkv.weight"), g(f"{s}.attn.qkv.bias")
        for name, w, b in zip("qkv", qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            out[f"{dst}.attn.{name}.weight"], out[f"{dst}.attn.{name}.bias"] = w, b
        out[f"{dst}.attn.out.weight"], out[f"{dst}.attn.out_bias"] = _layer_scaled(
            src, f"{prefix}{s}.ls1.gamma", g(f"{s}.attn.proj.weight"), g(f"{s}.attn.proj.bias"))
        out[f"{dst}.mlp.fc1.weight"] = g(f"{s}.mlp.fc1.weight")
        out[f"{dst}.mlp.fc1.bias"] = g(f"{s}.mlp.fc1.bias")
        out[f"{dst}.mlp.fc2.weight"], out[f"{dst}.mlp.fc2_bias"] = _layer_scaled(
            src, f"{prefix}{s}.ls2.gamma", g(f"{s}.mlp.fc2.weight"), g(f"{s}.mlp.fc2.bias"))
        for n in ("norm1", "norm2"):
            out[f"{dst}.{n}.weight"] = g(f"{s}.{n}.weight")
            out[f"{dst}.{n}.bias"] = g(f"{s}.{n}.bias")
    src.skip(prefix, _TIMM_UNUSED)
    return out, cfg


def import_timm_vit(state: State, num_heads: int, image_size: int | None = None,
                    eps: float | None = None, act: str = "gelu", prefix: str = "",
                    source: str = "ViT checkpoint") -> tuple[State, VisionConfig]:
    """A timm VisionTransformer state dict (incl. CLIP-style, with `norm_pre`) -> our ViT.

    Head counts are not recoverable from weights, so `num_heads` is given. `eps` defaults to
    what the layout says: 1e-5 for CLIP (with `norm_pre`), 1e-6 for timm's other ViTs. The
    activation is not in the weights either: timm builds its `*_clip_*` ViTs with GELU and the
    `*_clip_quickgelu_*` ones, with the same tensors, with QuickGELU, so `act` is given.
    LayerScale is folded into the projections; qk_norm and register tokens are refused. Position
    embeddings are resampled to `image_size` as timm does. Tensors outside `prefix` are not
    looked at.
    """
    src = _Source(state, source)
    out, cfg = _timm_vit(src, num_heads, image_size, eps, act, prefix, "bicubic_antialias")
    src.refuse_leftovers(within=prefix)
    return out, cfg


# --- CLIP ViT in Hugging Face's naming (transformers, X-VLM, EfficientVLM) ----------------

# The class token, patch convolution and position table of a CLIP vision tower. X-VLM's and
# EfficientVLM's `models/clip_vit.py` take transformers' names with the `embeddings.` level
# dropped and two of them renamed; every other name is the same in both.
_CLIP_EMBEDDINGS = {
    "transformers": ("embeddings.class_embedding", "embeddings.patch_embedding.weight",
                     "embeddings.position_embedding.weight"),
    "xvlm": ("class_embedding", "patch_embed.weight", "pos_embed.weight"),
}
# The index buffer 0, 1, ..., N that older transformers and X-VLM's module save beside the
# position table: it selects every row in order, which is what our model does.
_CLIP_UNUSED = (r"(?:embeddings\.)?position_ids",)
# Beside a transformers CLIPModel's vision tower: its text tower and the projections into
# CLIP's joint space. evlm's text side is a BERT and its ITC projections are its own, as
# X-VLM's are (it loads the vision tower alone), so nothing of evlm reads these.
_CLIP_MODEL_UNUSED = (r"text_model\..*", r"visual_projection\.weight", r"text_projection\.weight",
                      r"logit_scale")
# How transformers' CLIP saves its vision tower: alone (transformers 5), under
# `vision_model.` (CLIPVisionModel before it, and every CLIPModel).
_CLIP_PREFIXES = ("", "vision_model.")
# CLIPVisionConfig's defaults, for a config.json that leaves a key out as transformers does.
_CLIP_VISION_DEFAULTS = {"num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
# The activation each naming implies when nothing says otherwise: timm builds a ViT with GELU
# unless its name asks for QuickGELU; OpenAI trained CLIP with QuickGELU, and transformers'
# and X-VLM's CLIP configs say so.
NAMING_ACT = {"timm": "gelu", "transformers": "quick_gelu", "xvlm": "quick_gelu"}


def vision_naming(state: State, prefix: str = "") -> str | None:
    """Whose names a ViT under `prefix` carries, told by its patch convolution: "timm",
    "transformers" (CLIP) or "xvlm" (CLIP as X-VLM's `clip_vit.py` names it); None if none."""
    if f"{prefix}patch_embed.proj.weight" in state:
        return "timm"
    return next((naming for naming, (_, patch, _) in _CLIP_EMBEDDINGS.items()
                 if f"{prefix}{patch}" in state), None)


def _clip_vit(src: _Source, prefix: str, naming: str, num_heads: int, image_size: int | None,
              eps: float, act: str, kernel: str) -> tuple[State, VisionConfig]:
    """CLIP's vision tower -> our ViT: its pre-LayerNorm (`pre_layrnorm`) is our `norm_pre`,
    and its `post_layernorm` our final norm over every token, as X-VLM applies it (transformers'
    `last_hidden_state` stops before it; its `pooler_output` is our first token)."""
    g = lambda k: src.take(f"{prefix}{k}")  # noqa: E731
    cls_key, patch_key, pos_key = _CLIP_EMBEDDINGS[naming]
    patch_w = g(patch_key)
    width, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    pos = g(pos_key)[None]
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise CheckpointError(f"{src.name}: {prefix}{pos_key} has {pos.shape[1]} positions, not "
                              "one for the class token plus a square grid")
    image_size = image_size or grid * patch
    layer_ids = _layer_ids(src.state, f"{prefix}encoder.layers.")
    if not layer_ids:
        raise CheckpointError(f"{src.name}: no '{prefix}encoder.layers.N.*' tensors found")
    cfg = _vit_config(width=width, num_heads=num_heads, layers=len(layer_ids),
                      ffn=g("encoder.layers.0.mlp.fc1.weight").shape[0], act=act, eps=eps,
                      image_size=image_size, patch=patch, channels=channels, patch_bias=False,
                      pre_norm=True, kernel=kernel)
    out = {"vision.stem.weight": patch_w, "vision.cls_token": g(cls_key).reshape(1, 1, width),
           "vision.pos_embed": resample_pos_embed(pos, image_size // patch, kernel)}
    for ours, theirs in (("norm_pre", "pre_layrnorm"), ("norm", "post_layernorm")):
        for name in ("weight", "bias"):
            out[f"vision.{ours}.{name}"] = g(f"{theirs}.{name}")
    for i in layer_ids:
        s, dst = f"encoder.layers.{i}", f"{LAYER_PREFIX['vision']}.{i}"
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
            out[f"{dst}.attn.{ours}.weight"] = g(f"{s}.self_attn.{theirs}.weight")
            out[f"{dst}.attn.{ours}.bias"] = g(f"{s}.self_attn.{theirs}.bias")
        out[f"{dst}.attn.out.weight"] = g(f"{s}.self_attn.out_proj.weight")
        out[f"{dst}.attn.out_bias"] = g(f"{s}.self_attn.out_proj.bias")
        out[f"{dst}.mlp.fc1.weight"] = g(f"{s}.mlp.fc1.weight")
        out[f"{dst}.mlp.fc1.bias"] = g(f"{s}.mlp.fc1.bias")
        out[f"{dst}.mlp.fc2.weight"] = g(f"{s}.mlp.fc2.weight")
        out[f"{dst}.mlp.fc2_bias"] = g(f"{s}.mlp.fc2.bias")
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
            out[f"{dst}.{ours}.weight"] = g(f"{s}.{theirs}.weight")
            out[f"{dst}.{ours}.bias"] = g(f"{s}.{theirs}.bias")
    src.skip(prefix, _CLIP_UNUSED)
    return out, cfg


def clip_vision_settings(hf_config: dict, source: str = "CLIP config") -> dict:
    """What a transformers CLIPVisionModel or CLIPModel config.json says that the weights do
    not: {"num_heads", "eps", "act"} of its vision tower."""
    model_type = hf_config.get("model_type")
    if model_type == "clip":
        vision = hf_config.get("vision_config") or {}
    elif model_type == "clip_vision_model":
        vision = hf_config
    else:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a transformers CLIP "
                              "model (expected 'clip' or 'clip_vision_model')")
    vision = {**_CLIP_VISION_DEFAULTS, **vision}
    if vision["hidden_act"] not in _HF_ACT:
        raise CheckpointError(f"{source}: hidden_act {vision['hidden_act']!r} is not supported "
                              f"(supported: {', '.join(_HF_ACT)})")
    return {"num_heads": vision["num_attention_heads"], "eps": vision["layer_norm_eps"],
            "act": _HF_ACT[vision["hidden_act"]]}


def import_clip_vit(state: State, num_heads: int, image_size: int | None = None,
                    eps: float = 1e-5, act: str = "quick_gelu",
                    source: str = "CLIP checkpoint") -> tuple[State, VisionConfig]:
    """A CLIP vision tower in Hugging Face's naming -> our ViT: transformers' CLIPVisionModel
    or CLIPModel (its vision tower; the text tower and projections are known, unused), or
    X-VLM's `clip_vit.py` names. Heads, eps and activation are not in the weights: a
    transformers config gives them (`clip_vision_settings`); the defaults are OpenAI's CLIP
    (LayerNorm eps 1e-5, QuickGELU). Position embeddings are resampled to `image_size` as
    X-VLM resamples CLIP's (plain bicubic, as transformers' own interpolation).
    """
    prefix = next((p for p in _CLIP_PREFIXES if vision_naming(state, p) in _CLIP_EMBEDDINGS), None)
    if prefix is None:
        raise CheckpointError(f"{source}: no CLIP vision tower found (expected a key "
                              "'[vision_model.]embeddings.patch_embedding.weight' or "
                              "'patch_embed.weight')")
    src = _Source(state, source)
    out, cfg = _clip_vit(src, prefix, vision_naming(state, prefix), num_heads, image_size, eps, act,
                         "bicubic")
    if prefix == "vision_model.":
        src.skip("", _CLIP_MODEL_UNUSED)
    src.refuse_leftovers()
    return out, cfg


def import_vit(state: State, num_heads: int, image_size: int | None = None,
               act: str | None = None, source: str = "ViT checkpoint") -> tuple[State, VisionConfig]:
    """A ViT state dict in timm's naming or in CLIP's (transformers' or X-VLM's) -> our ViT,
    each with its own defaults (`import_timm_vit`, `import_clip_vit`); `act` None = the
    activation its naming implies (`NAMING_ACT`)."""
    if is_swin(state):  # timm's names too, but no ViT: say so rather than miss its positions
        raise CheckpointError(f"{source}: a Swin, not a ViT (it imports as teacher.vision.kind "
                              "swin)")
    if vision_naming(state) == "timm":
        return import_timm_vit(state, num_heads, image_size, act=act or NAMING_ACT["timm"],
                               source=source)
    if not any(vision_naming(state, p) in _CLIP_EMBEDDINGS for p in _CLIP_PREFIXES):
        raise CheckpointError(f"{source}: not a ViT in a naming evlm reads (expected timm's "
                              "'patch_embed.proj.weight', or CLIP's "
                              "'[vision_model.]embeddings.patch_embedding.weight' or "
                              "'patch_embed.weight')")
    return import_clip_vit(state, num_heads, image_size, act=act or "quick_gelu", source=source)


# --- Swin (timm, X-VLM) -------------------------------------------------------------------

# A timm Swin's ImageNet classifier: our heads are built per task.
_SWIN_UNUSED = (r"head\.fc\.(weight|bias)", r"head\.(weight|bias)")
# Swin features our encoder lacks, refused by name: absolute positions (`ape`), Swin V2's
# cosine attention with a log-spaced position MLP.
_SWIN_UNSUPPORTED = {
    r"absolute_pos_embed": "absolute position embeddings (ape)",
    r"layers\.\d+\.blocks\.\d+\.attn\.(logit_scale|cpb_mlp\..*)": "Swin V2 attention",
}


def is_swin(state: State, prefix: str = "") -> bool:
    """Whether the vision encoder under `prefix` is a Swin (timm's or X-VLM's names)."""
    return f"{prefix}layers.0.blocks.0.attn.relative_position_bias_table" in state


def _swin_config(src: _Source, prefix: str, image_size: int) -> tuple[VisionConfig, list[str]]:
    """The config a Swin's weights imply at `image_size`, and its blocks' source names in
    order. Heads are in the weights (a bias table column each), and so is the window (the
    largest table's); widths, head size and the window must be Swin's, one per stage."""
    state, source = src.state, src.name
    patch_w = state[f"{prefix}patch_embed.proj.weight"]
    first, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    stages = _layer_ids(state, f"{prefix}layers.")
    if stages != list(range(len(stages))):
        raise CheckpointError(f"{source}: Swin stages {stages} are not numbered 0, 1, ...")
    depths, blocks, heads, ffn = [], [], [], []
    for stage in stages:
        ids = _layer_ids(state, f"{prefix}layers.{stage}.blocks.")
        if ids != list(range(len(ids))):
            raise CheckpointError(f"{source}: Swin stage {stage} has blocks {ids}")
        depths.append(len(ids))
        for j in ids:
            block = f"{prefix}layers.{stage}.blocks.{j}"
            blocks.append(block)
            heads.append(state[f"{block}.attn.relative_position_bias_table"].shape[1])
            ffn.append(state[f"{block}.mlp.fc1.weight"].shape[0])
    tables = [state[f"{b}.attn.relative_position_bias_table"].shape[0] for b in blocks]
    window = (max(math.isqrt(rows) for rows in tables) + 1) // 2
    head_dim = first // heads[0]
    widths = [first * 2 ** stage for stage, depth in enumerate(depths) for _ in range(depth)]
    if any(w != h * head_dim for w, h in zip(widths, heads, strict=True)):
        raise CheckpointError(f"{source}: Swin heads {heads} do not all have {head_dim} channels")
    enc = EncoderConfig(width=first * 2 ** (len(depths) - 1), head_dim=head_dim, heads=heads,
                        ffn=ffn, norm="pre", act="gelu", eps=1e-5)
    try:
        cfg = VisionConfig(encoder=enc, image_size=image_size, patch_size=patch, channels=channels,
                           patch_bias=f"{prefix}patch_embed.proj.bias" in state,
                           swin=SwinConfig(depths=depths, window_size=window))
    except ValueError as error:
        raise CheckpointError(f"{source}: {error}") from None
    for block, rows, want in zip(blocks, tables, cfg.bias_table_rows(), strict=True):
        if rows != want:
            raise CheckpointError(
                f"{source}: {block}.attn.relative_position_bias_table has {rows} rows; at "
                f"{image_size} pixels that stage's windows need {want} (resizing the table to "
                "another window is not supported)")
    return cfg, blocks


def _swin_buffers(src: _Source, block: str, window: int, grid: int, shift: int) -> None:
    """A block's saved index and mask buffers (X-VLM keeps them; timm recomputes them) must be
    the ones our encoder computes from its shape: accounted for by checking, not copying."""
    expected = {"attn.relative_position_index": relative_position_index(window),
                "attn_mask": shift_mask(grid, window, shift) if shift else None}
    for name, want in expected.items():
        key = f"{block}.{name}"
        if key not in src:
            continue
        saved = src.take(key)
        if want is None or saved.shape != want.shape or not torch.equal(saved.to(want.dtype), want):
            raise CheckpointError(f"{src.name}: {key} is not the buffer of a Swin block of "
                                  f"window {window} and shift {shift} on a {grid}-patch grid")


def _swin(src: _Source, prefix: str, image_size: int | None) -> tuple[State, VisionConfig]:
    """A Swin in timm's names (patch merging at the start of stages 1, 2, ...) or in Microsoft's
    and X-VLM's (at the end of stages 0, 1, ...) -> our Swin encoder."""
    for pattern, feature in _SWIN_UNSUPPORTED.items():
        rx = re.compile(re.escape(prefix) + pattern)
        if any(rx.fullmatch(k) for k in src.state):
            raise CheckpointError(f"{src.name}: Swin with {feature} is not supported")
    if image_size is None:
        raise CheckpointError(f"{src.name}: a Swin's windows depend on the image size; give it")
    cfg, blocks = _swin_config(src, prefix, image_size)
    g = lambda k: src.take(f"{prefix}{k}")  # noqa: E731
    out = {"vision.stem.weight": g("patch_embed.proj.weight"),
           "vision.norm_pre.weight": g("patch_embed.norm.weight"),
           "vision.norm_pre.bias": g("patch_embed.norm.bias"),
           "vision.norm.weight": g("norm.weight"), "vision.norm.bias": g("norm.bias")}
    if cfg.patch_bias:
        out["vision.stem.bias"] = g("patch_embed.proj.bias")
    # Merging into stage s + 1 is X-VLM's `layers.{s}.downsample` and timm's `layers.{s+1}.…`.
    at_end = f"{prefix}layers.0.downsample.reduction.weight" in src
    for merge in range(cfg.swin.stages - 1):
        theirs = f"layers.{merge if at_end else merge + 1}.downsample"
        for name in ("norm.weight", "norm.bias", "reduction.weight"):
            out[f"vision.encoder.merges.{merge}.{name}"] = g(f"{theirs}.{name}")
    for i, (block, (grid, window, shift)) in enumerate(zip(blocks, layer_geometry(cfg),
                                                           strict=True)):
        t = lambda k, block=block: src.take(f"{block}.{k}")  # noqa: E731
        dst = f"{LAYER_PREFIX['vision']}.{i}"
        qkv_w, qkv_b = t("attn.qkv.weight"), t("attn.qkv.bias")
        for name, w, b in zip("qkv", qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            out[f"{dst}.attn.{name}.weight"], out[f"{dst}.attn.{name}.bias"] = w, b
        out[f"{dst}.attn.out.weight"], out[f"{dst}.attn.out_bias"] = (t("attn.proj.weight"),
                                                                      t("attn.proj.bias"))
        out[f"{dst}.attn.relative_position_bias_table"] = t("attn.relative_position_bias_table")
        out[f"{dst}.mlp.fc1.weight"], out[f"{dst}.mlp.fc1.bias"] = (t("mlp.fc1.weight"),
                                                                    t("mlp.fc1.bias"))
        out[f"{dst}.mlp.fc2.weight"], out[f"{dst}.mlp.fc2_bias"] = (t("mlp.fc2.weight"),
                                                                    t("mlp.fc2.bias"))
        for n in ("norm1", "norm2"):
            out[f"{dst}.{n}.weight"], out[f"{dst}.{n}.bias"] = t(f"{n}.weight"), t(f"{n}.bias")
        _swin_buffers(src, block, window, grid, shift)
    src.skip(prefix, _SWIN_UNUSED)
    return out, cfg


def import_timm_swin(state: State, image_size: int, prefix: str = "",
                     source: str = "Swin checkpoint") -> tuple[State, VisionConfig]:
    """A timm SwinTransformer state dict (or one in Microsoft's original names) -> our Swin
    encoder at `image_size`. Its shape is read from the weights: stages, heads (a bias table
    column each), window, FFN widths. Tensors outside `prefix` are not looked at."""
    src = _Source(state, source)
    out, cfg = _swin(src, prefix, image_size)
    src.refuse_leftovers(within=prefix)
    return out, cfg


# --- X-VLM / EfficientVLM ------------------------------------------------------------------

def _xvlm_vision(src: _Source, num_heads: int, image_size: int | None, act: str | None
                 ) -> tuple[State, VisionConfig]:
    """X-VLM's vision encoder, `vision_encoder.*`: its Swin, its ViT (timm's names, GELU, eps
    1e-6) or its CLIP ViT (`clip_vit.py`: QuickGELU, eps 1e-5, as its CLIP config says); `act`
    None = that activation. A ViT's positions are resampled as X-VLM's `interpolate_pos_embed`
    does, for both ViTs."""
    prefix = "vision_encoder."
    if is_swin(src.state, prefix):  # X-VLM's released checkpoints: the window gives the size
        return _swin(src, prefix, image_size)
    naming = vision_naming(src.state, prefix)
    if naming == "timm":
        return _timm_vit(src, num_heads, image_size, None, act or NAMING_ACT[naming], prefix,
                         "bicubic")
    if naming == "xvlm":
        return _clip_vit(src, prefix, naming, num_heads, image_size, 1e-5, act or NAMING_ACT[naming],
                         "bicubic")
    raise CheckpointError(f"{src.name}: no X-VLM vision encoder found (expected a key "
                          f"'{prefix}patch_embed.proj.weight' (ViT) or '{prefix}patch_embed.weight' "
                          "(CLIP ViT))")


def import_xvlm(state: State, vision_heads: int, text_hf_config: dict, image_size: int | None = None,
                source: str = "X-VLM checkpoint", vision_act: str | None = None
                ) -> tuple[State, dict]:
    """An X-VLM/EfficientVLM checkpoint -> our state dict + config parts.

    Layout: `vision_encoder.*` (a ViT in timm's naming, a CLIP ViT as X-VLM's `clip_vit.py`
    names it, or a Swin: `_xvlm_vision`), `text_encoder.bert.*` (or `text_encoder.*`)
    with BERT layers; layers from `fusion_layer` (= the first layer that has
    `crossattention.*`) on are fusion layers: NLVR2's model has twice as many, one per image
    in turn, and they import as they are (`vlm.paired_fusion`). Also `vision_proj`, `text_proj`,
    `temp` (ITC), the heads of `_XVLM_HEADS` and the MLM head `text_encoder.cls.predictions`.
    The text position table keeps the checkpoint's length (BERT's 512), however short the
    data's text. Returns the state and {"vision": VisionConfig, "text": TextConfig,
    "fusion": EncoderConfig}.
    """
    src = _Source(state, source)
    vis_state, vcfg = _xvlm_vision(src, vision_heads, image_size, vision_act)
    if any(k.startswith("text_decoder.") for k in state):
        raise CheckpointError(f"{source}: X-VLM's text decoder ('text_decoder.*', of its "
                              "generative VQA and captioning models) is not supported: evlm's "
                              "VQA head is a classifier and its captioning model the fusion "
                              "encoder run causally")
    p = _bert_prefix(state)
    if not p.startswith("text_encoder."):
        raise CheckpointError(f"{source}: no X-VLM text encoder ('text_encoder.*embeddings.*')")
    layer_ids = _layer_ids(state, f"{p}encoder.layer.")
    cross_ids = [i for i in layer_ids if f"{p}encoder.layer.{i}.crossattention.self.query.weight" in state]
    if not cross_ids:
        raise CheckpointError(f"{source}: no cross-attention layers "
                              f"('{p}encoder.layer.N.crossattention.*')")
    n_text = cross_ids[0]
    positions = state[f"{p}embeddings.position_embeddings.weight"].shape[0]
    tcfg = bert_text_config({**text_hf_config, "max_position_embeddings": positions}, n_text,
                            source)
    out = {**vis_state, **_bert(src, p, tcfg, [])}
    for j, i in enumerate(layer_ids[n_text:]):
        out.update(_bert_layer(src, f"{p}encoder.layer.{i}", f"{LAYER_PREFIX['fusion']}.{j}",
                               cross=True))
    t = tcfg.encoder
    n_fusion = len(layer_ids) - n_text
    fcfg = EncoderConfig(width=t.width, head_dim=t.head_dim, heads=[t.heads[0]] * n_fusion,
                         ffn=[t.ffn[0]] * n_fusion, norm="post", act=t.act, eps=t.eps,
                         cross_heads=[t.heads[0]] * n_fusion, kv_width=vcfg.encoder.width)
    for ours, theirs in (("heads.itc.vision_proj", "vision_proj"), ("heads.itc.text_proj", "text_proj")):
        for name in ("weight", "bias"):
            if f"{theirs}.{name}" in src:
                out[f"{ours}.{name}"] = src.take(f"{theirs}.{name}")
    for theirs, ours in _XVLM_HEADS.items():
        if f"{theirs}.0.weight" in src:
            out.update({f"{ours}.{i}.{name}": src.take(f"{theirs}.{i}.{name}")
                        for i in (0, 1, 3) for name in ("weight", "bias")})
    if "temp" in src:
        out["heads.itc.temp"] = src.take("temp").reshape(())
    out.update(_xvlm_mlm(src, f"{p.removesuffix('bert.')}cls.predictions", out["embeddings.word.weight"],
                         t.act))
    src.skip("", _XVLM_UNUSED)
    src.refuse_leftovers()
    return out, {"vision": vcfg, "text": tcfg, "fusion": fcfg}


def _xvlm_mlm(src: _Source, mlm: str, word_embeddings: Tensor, act: str) -> State:
    """X-VLM's MLM head (BERT's, over the fused tokens) -> our `mlm` head, when present."""
    if f"{mlm}.bias" not in src and f"{mlm}.decoder.bias" not in src:
        return {}
    if act != "gelu":  # BERT's head uses hidden_act; ours is fixed to GELU
        raise CheckpointError(f"{src.name}: an MLM head with activation {act!r} is not supported")
    out = {"heads.mlm.transform.0.weight": src.take(f"{mlm}.transform.dense.weight"),
           "heads.mlm.transform.0.bias": src.take(f"{mlm}.transform.dense.bias"),
           "heads.mlm.transform.2.weight": src.take(f"{mlm}.transform.LayerNorm.weight"),
           "heads.mlm.transform.2.bias": src.take(f"{mlm}.transform.LayerNorm.bias")}
    # The decoder's weight is tied to the word embeddings and its bias to `bias`: a checkpoint
    # may store both copies or only one, but two that differ leave the bias in doubt.
    decoder = f"{mlm}.decoder"
    out["heads.mlm.decoder.weight"] = (src.take(f"{decoder}.weight") if f"{decoder}.weight" in src
                                       else word_embeddings)
    biases = [src.take(k) for k in (f"{decoder}.bias", f"{mlm}.bias") if k in src]
    if not torch.equal(biases[0], biases[-1]):
        raise CheckpointError(f"{src.name}: {decoder}.bias and {mlm}.bias differ (they should be tied)")
    out["heads.mlm.decoder.bias"] = biases[0]
    return out
