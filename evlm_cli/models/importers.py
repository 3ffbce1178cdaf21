"""Importers for foreign checkpoints: pure functions from a state dict to ours plus a config.

Each maps keys one by one and splits fused tensors; loading and shape checks live elsewhere
(`checkpoint.check_state`), so these stay testable on any state dict.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from evlm_cli.errors import CheckpointError
from evlm_cli.models.checkpoint import read_weights
from evlm_cli.models.config import EncoderConfig, TextConfig, VisionConfig
from evlm_cli.models.vlm import LAYER_PREFIX

State = dict[str, Tensor]

_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "quick_gelu": "quick_gelu"}


def _need(state: State, key: str, source: str) -> Tensor:
    if key not in state:
        raise CheckpointError(f"{source}: missing tensor {key!r}")
    return state[key]


# --- HF BERT -------------------------------------------------------------------------------

def _bert_layer(state: State, src: str, dst: str, source: str, cross: bool = False) -> State:
    """One HF BertLayer (`src` = "...encoder.layer.{i}") as one of our post-norm Blocks."""
    g = lambda k: _need(state, f"{src}.{k}", source)  # noqa: E731
    out = {}

    def attention(hf: str, ours: str, norm: str):
        for proj, name in (("query", "q"), ("key", "k"), ("value", "v")):
            out[f"{dst}.{ours}.{name}.weight"] = g(f"{hf}.self.{proj}.weight")
            out[f"{dst}.{ours}.{name}.bias"] = g(f"{hf}.self.{proj}.bias")
        out[f"{dst}.{ours}.out.weight"] = g(f"{hf}.output.dense.weight")
        out[f"{dst}.{ours}.out_bias"] = g(f"{hf}.output.dense.bias")
        out[f"{dst}.{norm}.weight"] = g(f"{hf}.output.LayerNorm.weight")
        out[f"{dst}.{norm}.bias"] = g(f"{hf}.output.LayerNorm.bias")

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


def bert_text_config(hf_config: dict, layers: int | None = None) -> TextConfig:
    heads, width = hf_config["num_attention_heads"], hf_config["hidden_size"]
    n = layers if layers is not None else hf_config["num_hidden_layers"]
    enc = EncoderConfig(width=width, head_dim=width // heads, heads=[heads] * n,
                        ffn=[hf_config["intermediate_size"]] * n, norm="post",
                        act=_HF_ACT.get(hf_config.get("hidden_act", "gelu"), "gelu"),
                        eps=hf_config.get("layer_norm_eps", 1e-12))
    return TextConfig(encoder=enc, vocab_size=hf_config["vocab_size"],
                      max_positions=hf_config["max_position_embeddings"],
                      type_vocab_size=hf_config.get("type_vocab_size", 2),
                      pad_id=hf_config.get("pad_token_id", 0) or 0)


def import_hf_bert(state: State, hf_config: dict, text_layers: int | None = None,
                   fusion_layers: list[int] | None = None,
                   source: str = "BERT checkpoint") -> tuple[State, TextConfig]:
    """HF BERT -> our text embeddings + text encoder (its first `text_layers` layers).

    `fusion_layers` optionally names BERT layers whose self-attention and FFN initialise our
    fusion layers 0, 1, ..., as X-VLM initialises its cross layers from BERT's upper layers.
    """
    p = _bert_prefix(state)
    cfg = bert_text_config(hf_config, text_layers)
    e = f"{p}embeddings"
    out = {
        "embeddings.word.weight": _need(state, f"{e}.word_embeddings.weight", source),
        "embeddings.position.weight": _need(state, f"{e}.position_embeddings.weight", source),
        "embeddings.token_type.weight": _need(state, f"{e}.token_type_embeddings.weight", source),
        "embeddings.norm.weight": _need(state, f"{e}.LayerNorm.weight", source),
        "embeddings.norm.bias": _need(state, f"{e}.LayerNorm.bias", source),
    }
    for i in range(cfg.encoder.layers):
        out.update(_bert_layer(state, f"{p}encoder.layer.{i}", f"{LAYER_PREFIX['text']}.{i}", source))
    for j, i in enumerate(fusion_layers or []):
        out.update(_bert_layer(state, f"{p}encoder.layer.{i}", f"{LAYER_PREFIX['fusion']}.{j}", source))
    return out, cfg


def load_hf_bert_dir(directory: str | Path) -> tuple[State, dict]:
    """Read an HF BERT directory: config.json plus model.safetensors or pytorch_model.bin."""
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

def resample_pos_embed(pos: Tensor, grid: int) -> Tensor:
    """Bicubic resampling of [1, 1+g*g, D] position embeddings to a new grid (CLS kept)."""
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], 1)


def import_timm_vit(state: State, num_heads: int, image_size: int | None = None,
                    eps: float = 1e-6, act: str = "gelu", prefix: str = "",
                    source: str = "ViT checkpoint") -> tuple[State, VisionConfig]:
    """A timm VisionTransformer state dict (incl. CLIP-style, with `norm_pre`) -> our ViT.

    Head counts are not recoverable from weights, so `num_heads` is given. CLIP ViTs use
    eps=1e-5; timm's ImageNet ViTs 1e-6. Position embeddings are resampled to `image_size`.
    """
    g = lambda k: _need(state, f"{prefix}{k}", source)  # noqa: E731
    patch_w = g("patch_embed.proj.weight")
    width, channels, patch = patch_w.shape[0], patch_w.shape[1], patch_w.shape[2]
    pos = g("pos_embed")
    grid = int(round((pos.shape[1] - 1) ** 0.5))
    image_size = image_size or grid * patch
    layer_ids = sorted({int(m.group(1)) for k in state
                        if (m := re.match(rf"{re.escape(prefix)}blocks\.(\d+)\.", k))})
    if not layer_ids:
        raise CheckpointError(f"{source}: no 'blocks.N.*' tensors found")
    ffn = g("blocks.0.mlp.fc1.weight").shape[0]
    enc = EncoderConfig(width=width, head_dim=width // num_heads, heads=[num_heads] * len(layer_ids),
                        ffn=[ffn] * len(layer_ids), norm="pre", act=act, eps=eps)
    has_pre = f"{prefix}norm_pre.weight" in state
    cfg = VisionConfig(encoder=enc, image_size=image_size, patch_size=patch, channels=channels,
                       patch_bias=f"{prefix}patch_embed.proj.bias" in state, pre_norm=has_pre)
    out = {"vision.stem.weight": patch_w, "vision.cls_token": g("cls_token"),
           "vision.pos_embed": resample_pos_embed(pos, image_size // patch),
           "vision.norm.weight": g("norm.weight"), "vision.norm.bias": g("norm.bias")}
    if cfg.patch_bias:
        out["vision.stem.bias"] = g("patch_embed.proj.bias")
    if has_pre:
        out["vision.norm_pre.weight"] = g("norm_pre.weight")
        out["vision.norm_pre.bias"] = g("norm_pre.bias")
    for i in layer_ids:
        src, dst = f"blocks.{i}", f"{LAYER_PREFIX['vision']}.{i}"
        qkv_w, qkv_b = g(f"{src}.attn.qkv.weight"), g(f"{src}.attn.qkv.bias")
        for name, w, b in zip("qkv", qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            out[f"{dst}.attn.{name}.weight"], out[f"{dst}.attn.{name}.bias"] = w, b
        out[f"{dst}.attn.out.weight"] = g(f"{src}.attn.proj.weight")
        out[f"{dst}.attn.out_bias"] = g(f"{src}.attn.proj.bias")
        out[f"{dst}.mlp.fc1.weight"] = g(f"{src}.mlp.fc1.weight")
        out[f"{dst}.mlp.fc1.bias"] = g(f"{src}.mlp.fc1.bias")
        out[f"{dst}.mlp.fc2.weight"] = g(f"{src}.mlp.fc2.weight")
        out[f"{dst}.mlp.fc2_bias"] = g(f"{src}.mlp.fc2.bias")
        for n in ("norm1", "norm2"):
            out[f"{dst}.{n}.weight"] = g(f"{src}.{n}.weight")
            out[f"{dst}.{n}.bias"] = g(f"{src}.{n}.bias")
    return out, cfg


# --- X-VLM / EfficientVLM ------------------------------------------------------------------

def import_xvlm(state: State, vision_heads: int, text_hf_config: dict, image_size: int | None = None,
                source: str = "X-VLM checkpoint") -> tuple[State, dict]:
    """An X-VLM/EfficientVLM checkpoint (ViT vision encoder) -> our state dict + config parts.

    Layout: `vision_encoder.*` (timm-style ViT), `text_encoder.bert.*` with BERT layers; layers
    from `fusion_layer` (= the first layer that has `crossattention.*`) on are fusion layers.
    Also `vision_proj`, `text_proj`, `temp` (ITC) and `itm_head`.
    Returns the state and {"vision": VisionConfig, "text": TextConfig, "fusion": EncoderConfig}.
    """
    vis_state, vcfg = import_timm_vit(state, vision_heads, image_size=image_size,
                                      prefix="vision_encoder.", source=source)
    layer_ids = sorted({int(m.group(1)) for k in state
                        if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.", k))})
    cross_ids = sorted({int(m.group(1)) for k in state
                        if (m := re.match(r"text_encoder\.bert\.encoder\.layer\.(\d+)\.crossattention", k))})
    if not cross_ids:
        raise CheckpointError(f"{source}: no cross-attention layers "
                              "('text_encoder.bert.encoder.layer.N.crossattention.*')")
    n_text = cross_ids[0]
    text_state, tcfg = import_hf_bert(state, text_hf_config, text_layers=n_text, source=source)
    out = {**vis_state, **text_state}
    for j, i in enumerate(layer_ids[n_text:]):
        out.update(_bert_layer(state, f"text_encoder.bert.encoder.layer.{i}", f"{LAYER_PREFIX['fusion']}.{j}",
                               source, cross=True))
    t = tcfg.encoder
    n_fusion = len(layer_ids) - n_text
    fcfg = EncoderConfig(width=t.width, head_dim=t.head_dim, heads=[t.heads[0]] * n_fusion,
                         ffn=[t.ffn[0]] * n_fusion, norm="post", act=t.act, eps=t.eps,
                         cross_heads=[t.heads[0]] * n_fusion, kv_width=vcfg.encoder.width)
    for ours, theirs in (("heads.itc.vision_proj", "vision_proj"), ("heads.itc.text_proj", "text_proj"),
                         ("heads.itm", "itm_head")):
        for p in ("weight", "bias"):
            if f"{theirs}.{p}" in state:
                out[f"{ours}.{p}"] = state[f"{theirs}.{p}"]
    if "temp" in state:
        out["heads.itc.temp"] = state["temp"].reshape(())
    return out, {"vision": vcfg, "text": tcfg, "fusion": fcfg}
