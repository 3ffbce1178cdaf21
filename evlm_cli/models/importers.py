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
from evlm_cli.models.config import EncoderConfig, TextConfig, VisionConfig
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
# X-VLM heads our model does not have: the ITM head is an MLP (Linear, LayerNorm, GELU,
# Linear) where ours is one Linear, and the box head serves grounding, which evlm lacks.
_XVLM_UNUSED = (r"itm_head\.[013]\.(weight|bias)", r"bbox_head\.\d+\.(weight|bias)")

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

def _layer_scaled(src: _Source, key: str, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Fold a timm LayerScale (`key`, per-channel gamma on a sublayer's output) into the rows of
    that sublayer's output projection: the block computes the same without a parameter of its
    own, and pruning heads or neurons (columns) is unaffected."""
    if key not in src:
        return weight, bias
    gamma = src.take(key)
    return weight * gamma[:, None], bias * gamma


def _timm_vit(src: _Source, num_heads: int, image_size: int | None, eps: float | None, act: str,
              prefix: str) -> tuple[State, VisionConfig]:
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
    enc = EncoderConfig(width=width, head_dim=width // num_heads, heads=[num_heads] * len(layer_ids),
                        ffn=[ffn] * len(layer_ids), norm="pre", act=act, eps=eps)
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
    embeddings are resampled to `image_size`. Tensors outside `prefix` are not looked at.
    """
    src = _Source(state, source)
    out, cfg = _timm_vit(src, num_heads, image_size, eps, act, prefix)
    src.refuse_leftovers(within=prefix)
    return out, cfg


# --- X-VLM / EfficientVLM ------------------------------------------------------------------

def import_xvlm(state: State, vision_heads: int, text_hf_config: dict, image_size: int | None = None,
                source: str = "X-VLM checkpoint") -> tuple[State, dict]:
    """An X-VLM/EfficientVLM checkpoint (ViT vision encoder) -> our state dict + config parts.

    Layout: `vision_encoder.*` (timm-style ViT), `text_encoder.bert.*` (or `text_encoder.*`)
    with BERT layers; layers from `fusion_layer` (= the first layer that has
    `crossattention.*`) on are fusion layers. Also `vision_proj`, `text_proj`, `temp` (ITC),
    `itm_head` and the MLM head `text_encoder.cls.predictions`.
    Returns the state and {"vision": VisionConfig, "text": TextConfig, "fusion": EncoderConfig}.
    """
    src = _Source(state, source)
    vis_state, vcfg = _timm_vit(src, vision_heads, image_size, None, "gelu", "vision_encoder.")
    p = _bert_prefix(state)
    if not p.startswith("text_encoder."):
        raise CheckpointError(f"{source}: no X-VLM text encoder ('text_encoder.*embeddings.*')")
    layer_ids = _layer_ids(state, f"{p}encoder.layer.")
    cross_ids = [i for i in layer_ids if f"{p}encoder.layer.{i}.crossattention.self.query.weight" in state]
    if not cross_ids:
        raise CheckpointError(f"{source}: no cross-attention layers "
                              f"('{p}encoder.layer.N.crossattention.*')")
    n_text = cross_ids[0]
    tcfg = bert_text_config(text_hf_config, n_text, source)
    out = {**vis_state, **_bert(src, p, tcfg, [])}
    for j, i in enumerate(layer_ids[n_text:]):
        out.update(_bert_layer(src, f"{p}encoder.layer.{i}", f"{LAYER_PREFIX['fusion']}.{j}",
                               cross=True))
    t = tcfg.encoder
    n_fusion = len(layer_ids) - n_text
    fcfg = EncoderConfig(width=t.width, head_dim=t.head_dim, heads=[t.heads[0]] * n_fusion,
                         ffn=[t.ffn[0]] * n_fusion, norm="post", act=t.act, eps=t.eps,
                         cross_heads=[t.heads[0]] * n_fusion, kv_width=vcfg.encoder.width)
    for ours, theirs in (("heads.itc.vision_proj", "vision_proj"), ("heads.itc.text_proj", "text_proj"),
                         ("heads.itm", "itm_head")):
        for name in ("weight", "bias"):
            if f"{theirs}.{name}" in src:
                out[f"{ours}.{name}"] = src.take(f"{theirs}.{name}")
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
