"""The X-VLM-style vision-language model: ViT, BERT text encoder, cross-attention fusion, heads."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from evlm_cli.models.blocks import Block, DecoderCache, Encoder, EncoderOutput, Gates
from evlm_cli.models.config import (
    ENCODERS,
    POS_RESAMPLE,
    EncoderConfig,
    VisionConfig,
    VLMConfig,
)
from evlm_cli.models.groups import PrunableGroup
from evlm_cli.models.swin import SwinEncoder

# Where each encoder's layers live in the state dict: "<prefix>.<layer>.<tensor>".
LAYER_PREFIX = {"vision": "vision.encoder.layers", "text": "text.layers", "fusion": "fusion.layers"}


class ConvStem(nn.Module):
    """Convolutions down to the patch grid, then a 1x1 to the width.

    Each halving is a stride-2 3x3 conv followed by a stride-1 3x3 conv (BatchNorm, ReLU).
    Early convolutions give a ViT the locality prior it otherwise has to learn from data,
    which small datasets cannot afford (Xiao et al. 2021); the second conv per stage lets
    each patch token see shape, not just colour.
    """

    def __init__(self, cfg: VisionConfig, width: int):
        super().__init__()
        steps = int(round(math.log2(cfg.patch_size)))
        if 2 ** steps != cfg.patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch size, not {cfg.patch_size}")
        layers, c_in = [], cfg.channels
        for s in range(steps):
            c_out = max(width // 2 ** (steps - s), 16)
            for stride, c_from in ((2, c_in), (1, c_out)):
                layers += [nn.Conv2d(c_from, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out),
                           nn.ReLU()]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, width, 1))
        self.proj = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        if not self.training:
            # oneDNN's convolutions run faster on channels-last images (same values)
            images = images.contiguous(memory_format=torch.channels_last)
        return self.proj(images)

    def fold_batchnorm(self) -> None:
        """Fold each BatchNorm into the convolution before it (eval mode only: the running
        statistics become part of the weights), for inference; the stem computes the same."""
        if self.training:
            raise RuntimeError("fold_batchnorm needs eval mode: training BatchNorm uses batch statistics")
        layers, folded = list(self.proj), []
        for index, layer in enumerate(layers):
            if isinstance(layer, nn.BatchNorm2d):
                continue
            following = layers[index + 1] if index + 1 < len(layers) else None
            if isinstance(layer, nn.Conv2d) and isinstance(following, nn.BatchNorm2d):
                layer = fuse_conv_bn_eval(layer, following)
            folded.append(layer)
        self.proj = nn.Sequential(*folded)


def sincos_positions(grid: int, width: int) -> Tensor:
    """MAE's fixed 2-D sin-cos table for a grid x grid patch grid, [grid * grid, width] in
    row-major order: the first half of the channels encodes the row, the second the column,
    each as sines and cosines of geometrically spaced frequencies (periods 2 pi up to
    20,000 pi).

    Its rows have norm sqrt(width / 2): as large as the patch features, where ViT's N(0, 0.02)
    start is much smaller, so small that the first layer drowned the positions and no question
    about a mosaic tile could be learnt. The mosaic spec starts from this table
    (docs/notes/sincos_positions.md).
    """
    if width % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, not {width}")
    quarter = width // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, columns = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                   torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coordinate in (rows, columns):
        angles = coordinate.reshape(-1, 1) * frequencies[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()


class VisionEncoder(nn.Module):
    """ViT: patch embedding, CLS token, learned positions, pre-norm blocks, final norm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        w = cfg.encoder.width
        if cfg.stem == "patch":
            self.stem = nn.Conv2d(cfg.channels, w, cfg.patch_size, cfg.patch_size, bias=cfg.patch_bias)
        else:
            self.stem = ConvStem(cfg, w)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        if cfg.pos_init == "sincos":
            grid = cfg.image_size // cfg.patch_size
            self.pos_embed = nn.Parameter(torch.cat([torch.zeros(1, w), sincos_positions(grid, w)])[None])
        elif cfg.pos_init == "normal":
            self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, w) * 0.02)
        else:
            raise ValueError(f"unknown pos_init {cfg.pos_init!r} (known: normal, sincos)")
        self.norm_pre = nn.LayerNorm(w, eps=cfg.encoder.eps) if cfg.pre_norm else nn.Identity()
        self.encoder = Encoder(cfg.encoder, "vision")
        self.norm = nn.LayerNorm(w, eps=cfg.encoder.eps)

    def forward(self, images: Tensor, gates: Gates | None = None, output_hidden: bool = False,
                output_attentions: bool = False) -> EncoderOutput:
        x = self.stem(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        out = self.encoder(self.norm_pre(x), gates=gates, output_hidden=output_hidden,
                           output_attentions=output_attentions)
        out.last = self.norm(out.last)
        return out


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + position + token type, then LayerNorm."""

    def __init__(self, cfg, width: int, eps: float):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, width, padding_idx=cfg.pad_id)
        self.position = nn.Embedding(cfg.max_positions, width)
        self.token_type = nn.Embedding(cfg.type_vocab_size, width)
        self.norm = nn.LayerNorm(width, eps=eps)

    def forward(self, input_ids: Tensor, position_offset: int = 0) -> Tensor:
        """`position_offset`: the position of the first token (a decoder step's, after the
        cached ones)."""
        positions = torch.arange(position_offset, position_offset + input_ids.shape[1],
                                 device=input_ids.device)
        x = self.word(input_ids) + self.position(positions)[None] + self.token_type.weight[0]
        return self.norm(x)


class ITCHead(nn.Module):
    """Image-text contrastive projections with a learned temperature."""

    def __init__(self, vision_width: int, text_width: int, embed_dim: int):
        super().__init__()
        self.vision_proj = nn.Linear(vision_width, embed_dim)
        self.text_proj = nn.Linear(text_width, embed_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))

    def image_embeds(self, image_cls: Tensor) -> Tensor:
        """The images' normalised embeddings [B, embed_dim]."""
        return nn.functional.normalize(self.vision_proj(image_cls), dim=-1)

    def forward(self, image_cls: Tensor, text_cls: Tensor) -> Tensor:
        """Similarity logits [B_image, B_text]."""
        img = self.image_embeds(image_cls)
        txt = nn.functional.normalize(self.text_proj(text_cls), dim=-1)
        return img @ txt.t() / self.temp.clamp(min=1e-3)


class MLMHead(nn.Module):
    def __init__(self, width: int, vocab_size: int, eps: float):
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=eps))
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.decoder(self.transform(hidden))


def xvlm_mlp(width: int, outputs: int) -> nn.Sequential:
    """X-VLM's classifier (`models/xvlm.py:build_mlp`): Linear to twice the width, LayerNorm
    (torch's eps), GELU, Linear to the outputs. X-VLM's ITM and NLVR2 heads take this shape, and
    so does evlm's VQA classifier, so that their weights import index by index (0, 1, 3)."""
    return nn.Sequential(nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(),
                         nn.Linear(2 * width, outputs))


# Heads that read a text fused with two images, whose fusion layers come in pairs, layer 2i
# reading the first image and 2i + 1 the second (`paired_fusion`): NLVR2's classifier and
# text assignment's, the NLVR2 domain pre-training (X-VLM's `NLVR_pretrain.py`).
PAIRED_HEADS = ("nlvr2", "ta")


def build_heads(cfg: VLMConfig) -> nn.ModuleDict:
    w = cfg.fusion.width
    heads = nn.ModuleDict()
    for name in cfg.heads:
        if name == "vqa":
            if cfg.num_answers < 1:
                raise ValueError("the vqa head needs num_answers >= 1")
            heads["vqa"] = xvlm_mlp(w, cfg.num_answers)
        elif name in PAIRED_HEADS:
            if cfg.fusion.layers % 2:
                raise ValueError(f"the {name} head reads a fusion encoder whose layers take the "
                                 f"two images in turn, so it needs an even number of fusion "
                                 f"layers, not {cfg.fusion.layers}")
            # NLVR2: true or false (X-VLM's cls_head); text assignment: the text describes the
            # first image, the second or neither (X-VLM's ta_head, a single Linear)
            heads[name] = xvlm_mlp(w, 2) if name == "nlvr2" else nn.Linear(w, 3)
        elif name == "itm":
            heads["itm"] = xvlm_mlp(w, 2) if cfg.itm_head == "mlp" else nn.Linear(w, 2)
        elif name == "itc":
            heads["itc"] = ITCHead(cfg.vision.encoder.width, cfg.text.encoder.width, cfg.embed_dim)
        elif name == "mlm":
            heads["mlm"] = MLMHead(w, cfg.text.vocab_size, cfg.fusion.eps)
        else:
            raise ValueError(f"unknown head {name!r} (known: vqa, nlvr2, ta, itm, itc, mlm)")
    return heads


@dataclass
class VLMOutput:
    vision: EncoderOutput
    text: EncoderOutput
    fusion: EncoderOutput
    text_mask: Tensor | None = None  # [B, L] 1 = a real token (the fusion tokens are the text's)

    def encoder(self, name: str) -> EncoderOutput:
        return getattr(self, name)


# Tasks whose model runs as a decoder: causal self-attention in the text and fusion encoders, so
# each position predicts the next token (X-VLM's captioning model). Nothing else changes, so
# pruning and slicing apply as they are.
CAUSAL_TASKS = ("captioning",)


class VLM(nn.Module):
    """Vision encoder + text encoder + fusion encoder (text self-attn, cross-attn to image, FFN)."""

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        if cfg.fusion.kv_width != cfg.vision.encoder.width:
            raise ValueError(f"fusion.kv_width ({cfg.fusion.kv_width}) must equal the vision width "
                             f"({cfg.vision.encoder.width})")
        self.config = cfg
        tcfg = cfg.text.encoder
        self.vision = SwinEncoder(cfg.vision) if cfg.vision.swin is not None else VisionEncoder(cfg.vision)
        self.embeddings = TextEmbeddings(cfg.text, tcfg.width, tcfg.eps)
        self.text = Encoder(tcfg, "text")
        self.text_to_fusion = (nn.Linear(tcfg.width, cfg.fusion.width)
                               if tcfg.width != cfg.fusion.width else nn.Identity())
        self.fusion = Encoder(cfg.fusion, "fusion")
        self.heads = build_heads(cfg)

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None,
                gates: Gates | None = None, output_hidden: bool = False,
                output_attentions: bool = False, causal: bool = False) -> VLMOutput:
        """One pass over image-text pairs. `images` [B, 3, H, W], or [B, 2, 3, H, W] for a text
        about two images (NLVR2): both are encoded (vision rows 2b, 2b + 1), and the text passes
        the fusion layers once, layer 2i cross-attending to the first image and 2i + 1 to the
        second, as in X-VLM's `models/model_nlvr.py` (see `paired_fusion`)."""
        opts = dict(gates=gates, output_hidden=output_hidden, output_attentions=output_attentions)
        two_images = images.ndim == 5
        vision = self.vision(images.flatten(0, 1) if two_images else images, **opts)
        text = self.encode_text(input_ids, attention_mask, causal=causal, **opts)
        image_tokens = vision.last
        if two_images:
            image_tokens = tuple(image_tokens.unflatten(0, (-1, 2)).unbind(1))
        fusion = self.fuse(text.last, attention_mask, image_tokens, causal=causal, **opts)
        return VLMOutput(vision, text, fusion, attention_mask)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                    cache: DecoderCache | None = None, **opts) -> EncoderOutput:
        """The text encoder alone (ITC ranks by it without the image). With a `cache`
        (causal=True), `input_ids` are the tokens after the cached ones."""
        offset = cache.length if cache is not None else 0
        return self.text(self.embeddings(input_ids, offset), mask=attention_mask, cache=cache,
                         **opts)

    def fuse(self, text_tokens: Tensor, attention_mask: Tensor | None,
             image_tokens: Tensor | tuple[Tensor, ...], **opts) -> EncoderOutput:
        """The fusion encoder over encoded text, cross-attending to encoded image tokens (a tuple
        of images: layer i reads image i mod their number;
        `causal=True`: each text position sees only the ones before it, as a decoder; a
        `cache=DecoderCache` then feeds only the new positions, see `Encoder.forward`)."""
        return self.fusion(self.text_to_fusion(text_tokens), mask=attention_mask, kv=image_tokens,
                           **opts)

    def similarity(self, image_tokens: Tensor, text_tokens: Tensor) -> Tensor:
        """ITC logits [B_image, B_text] from the two encoders' [CLS] tokens."""
        return self.heads["itc"](image_tokens[:, 0], text_tokens[:, 0])

    def match_logits(self, fused_tokens: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """ITM logits [B, 2] (no match, match) from the pooled fusion output."""
        return self.heads["itm"](self.pool(fused_tokens, text_mask))

    def mlm_logits(self, fused_tokens: Tensor) -> Tensor:
        return self.heads["mlm"](fused_tokens)

    def pool(self, fused_tokens: Tensor, text_mask: Tensor | None = None) -> Tensor:
        """What the ITM and task heads read: the fused CLS token (X-VLM), or the maximum over
        the real tokens.

        Max pooling lets a comparison that forms at one word ("is there a red shape?" at
        "red") reach the head without first being routed into CLS, which a model trained
        from scratch learns slowly; the default specs pool by max (docs/notes/pooling.md).
        """
        if self.config.pool == "cls":
            return fused_tokens[:, 0]
        if text_mask is not None:
            pad = ~text_mask.bool()[..., None]
            fused_tokens = fused_tokens.masked_fill(pad, torch.finfo(fused_tokens.dtype).min)
        return fused_tokens.amax(1)

    def pooled(self, out: VLMOutput) -> Tensor:
        return self.pool(out.fusion.last, out.text_mask)

    def logits(self, task: str, out: VLMOutput) -> Tensor:
        """Task logits of one forward pass: VQA answer scores from the pooled fusion output;
        NLVR2's true/false from the pooled output of the text fused with both images; for retrieval,
        the ITM match scores of the given pairs (what re-ranking computes); for captioning,
        next-token scores at every text position [B, L, V] (run the pass with causal=True)."""
        if task == "vqa":
            return self.heads["vqa"](self.pooled(out))
        if task == "nlvr2":
            if out.vision.last.shape[0] != 2 * out.text.last.shape[0]:
                raise ValueError("nlvr2 reads a text fused with two images: pass images as "
                                 "[B, 2, 3, H, W]")
            return self.heads["nlvr2"](self.pooled(out))
        if task in ("itm", "retrieval"):
            return self.match_logits(out.fusion.last, out.text_mask)
        if task == "captioning":
            return self.mlm_logits(out.fusion.last)
        raise ValueError(f"no head for task {task!r}")

    def prunable_groups(self, units=("heads", "ffn")) -> list[PrunableGroup]:
        return prunable_groups(self.config, units)


# FFN widths are padded with zero neurons to a multiple of this for inference: 16 floats are
# one AVX-512 register, and narrower multiples ran slower (docs/notes/ffn_padding.md).
INFERENCE_WIDTH_MULTIPLE = 16


def for_inference(model: VLM) -> VLM:
    """A copy of `model`, in eval mode, as it runs fastest for inference and computing the
    same logits. What latency is timed on and what is exported; parameter counts are taken
    from the model as saved. A pruned model's narrow layers spend their time in operators
    whose cost does not shrink with width, so this removes operators
    (docs/notes/inference_copy.md):
      - a convolutional stem's BatchNorms are folded into its convolutions;
      - each attention's projections of one input run as one matmul, and every output bias
        sits inside its projection (`fuse_projections`);
      - FFN widths are padded with zero neurons to a multiple of 16 (`MLP.pad_hidden`);
      - the constant output of an empty sublayer is added once, to an earlier bias, instead
        of to every token at every call (`fold_constants`).
    The copy is for inference only: it is not trained or saved, and the hidden states of
    single layers (which distillation reads) can differ from the model's by those constants.
    """
    fast = copy.deepcopy(model).eval()
    if isinstance(fast.vision.stem, ConvStem):
        fast.vision.stem.fold_batchnorm()
    for encoder in (fast.vision.encoder, fast.text, fast.fusion):
        for block in encoder.layers:
            block.attn.fuse_projections(cross=False)
            if block.cross is not None:
                block.cross.fuse_projections(cross=True)
            block.mlp.fuse_projections()
            block.mlp.pad_hidden(INFERENCE_WIDTH_MULTIPLE)
    vision = fast.vision
    if isinstance(vision, SwinEncoder):
        # Patch merging reads the residual stream between stages, so each stage folds alone;
        # only the first has a bias just before it (its patch norm's).
        for stage, blocks in enumerate(vision.encoder.stage_layers()):
            fold_constants(blocks, vision.norm_pre.bias if stage == 0 else None)
    else:
        fold_constants(vision.encoder, vision.norm_pre.bias
                       if isinstance(vision.norm_pre, nn.LayerNorm) else vision.pos_embed)
    fold_constants(fast.text, fast.embeddings.norm.bias)
    fold_constants(fast.fusion, getattr(fast.text_to_fusion, "bias", None))
    return fast


def fold_constants(encoder: Encoder | list[Block], start: Tensor | None) -> None:
    """Move the output of each empty sublayer (no heads or no neurons: its bias, whatever its
    input) into the bias added just before it, and skip the sublayer (inference only).

    In a pre-norm layer nothing reads the residual stream between two sublayers' additions,
    so adding a constant one addition earlier changes no later value, and the encoder's
    output is unchanged. `start` is the bias that ends the encoder's input (None: the first
    constants stay). Post-norm layers normalise after each addition, so their constants stay.
    `encoder` may also be a list of consecutive blocks (a Swin stage).
    """
    target = start
    with torch.no_grad():
        for block in getattr(encoder, "layers", encoder):
            if not block.pre_norm:
                target = None
                continue
            folded = set(block.folded)
            for name, sublayer in block.sublayers():
                if name in folded:  # already moved (a copy prepared twice)
                    continue
                if not sublayer.empty:
                    target = sublayer.output_bias
                elif target is not None:
                    target.add_(sublayer.output_bias)
                    folded.add(name)
            block.folded = frozenset(folded)


class TaskLogits(nn.Module):
    """A task's logits from (images, input_ids, attention_mask): what evaluation scores and
    times, and what an exported graph computes."""

    def __init__(self, model: VLM, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.model(images, input_ids, attention_mask, causal=self.task in CAUSAL_TASKS)
        return self.model.logits(self.task, out)


def model_inputs(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The positional inputs of `VLM.forward` from a batch of the data loader."""
    return batch["images"], batch["input_ids"], batch["attention_mask"]


def _head_params(width: int, head_dim: int, kv_width: int) -> int:
    """Parameters one head owns: its rows of q, k, v (with biases) and its columns of out."""
    return (width * head_dim + head_dim) + 2 * (kv_width * head_dim + head_dim) + head_dim * width


def prunable_groups(cfg: VLMConfig, units=("heads", "ffn")) -> list[PrunableGroup]:
    """Every prunable group (encoder x unit x layer) with its exact per-unit parameter cost."""
    groups = []
    for enc in ENCODERS:
        ecfg: EncoderConfig = cfg.encoder(enc)
        hd = ecfg.head_dim
        # A Swin's layers differ in width by stage, and each head owns a column of its layer's
        # relative position bias table.
        vision = enc == "vision"
        widths = cfg.vision.layer_widths() if vision else [ecfg.width] * ecfg.layers
        table_rows = cfg.vision.bias_table_rows() if vision else [0] * ecfg.layers
        for i in range(ecfg.layers):
            w = widths[i]

            def add(unit, size, cost, enc=enc, i=i):
                if size:
                    groups.append(PrunableGroup(f"{enc}.{i}.{unit}", enc, unit, i, size, cost))
            if "heads" in units:
                add("heads", ecfg.heads[i], _head_params(w, hd, w) + table_rows[i])
                if ecfg.has_cross:
                    add("cross_heads", ecfg.cross_heads[i], _head_params(w, hd, ecfg.kv_width))
            if "ffn" in units:
                add("ffn", ecfg.ffn[i], 2 * w + 1)
            if "layers" in units:
                add("attn_layer", 1 if ecfg.heads[i] else 0, 0)
                if ecfg.has_cross:
                    add("cross_layer", 1 if ecfg.cross_heads[i] else 0, 0)
                add("ffn_layer", 1 if ecfg.ffn[i] else 0, 0)
    return groups


def param_breakdown(model: VLM) -> dict[str, int]:
    """Parameters per part: embeddings, vision, text, fusion, heads, and the total."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    v = model.vision
    parts = {
        # the stem, and a ViT's class token and positions (a Swin has neither)
        "embeddings": count(v) - count(v.encoder) - count(v.norm) - count(v.norm_pre)
        + count(model.embeddings),
        "vision": count(v.encoder) + count(v.norm) + count(v.norm_pre),
        "text": count(model.text),
        "fusion": count(model.fusion) + count(model.text_to_fusion),
        "heads": count(model.heads),
    }
    parts["total"] = count(model)
    assert parts["total"] == sum(parts[k] for k in parts if k != "total")
    return parts


def prunable_param_count(cfg: VLMConfig) -> dict[str, int]:
    """Parameters in heads and FFN neurons per encoder: what pruning can remove."""
    totals = dict.fromkeys(ENCODERS, 0)
    for g in prunable_groups(cfg):
        totals[g.encoder] += g.size * g.unit_params
    totals["total"] = sum(totals.values())
    return totals


def resample_pos_embed(pos: Tensor, grid: int, kernel: str = "bicubic_antialias") -> Tensor:
    """Bicubic resampling of [1, 1+g*g, D] position embeddings to a new grid (CLS kept).

    `kernel` (`VisionConfig.pos_resample`) follows the weights' source, whose fine-tuned models
    expect its values: "bicubic_antialias" (torch's PIL-like kernel) as timm's
    `resample_abs_pos_embed`; "bicubic", without antialiasing, as X-VLM's
    `interpolate_pos_embed` and transformers' CLIP. They differ growing the grid too: torch's
    antialiased bicubic is PIL's cubic (a = -0.5), the plain one a = -0.75.
    """
    if kernel not in POS_RESAMPLE:
        raise ValueError(f"unknown position resampling {kernel!r} (known: {', '.join(POS_RESAMPLE)})")
    old = int(round((pos.shape[1] - 1) ** 0.5))
    if old == grid:
        return pos
    cls, patches = pos[:, :1], pos[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    patches = nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic",
                                        align_corners=False, antialias=kernel == "bicubic_antialias")
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)], 1)


def paired_fusion(fusion: EncoderConfig) -> EncoderConfig:
    """The fusion config of X-VLM's NLVR2 model (`models/model_nlvr.py`): every layer twice, so
    that layer 2i reads the first image and 2i + 1 the second."""
    return fusion.select([i for i in range(fusion.layers) for _ in range(2)])


def paired_fusion_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` with fusion layer i copied to layers 2i and 2i + 1, as X-VLM's NLVR2 model starts
    from a pre-trained one (`model_nlvr.py:XVLM.load_pretrained`)."""
    prefix = LAYER_PREFIX["fusion"] + "."
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for key, value in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            for copy_index in (2 * int(index), 2 * int(index) + 1):
                out[f"{prefix}{copy_index}.{rest}"] = value.clone()
    return out


def with_heads(model: VLM, heads: list[str], *, num_answers: int | None = None,
               pool: str | None = None, image_size: int | None = None) -> VLM:
    """The same encoders under another set of heads, and optionally for another image size.

    A head that the model has, with the same shape, keeps its weights (the retrieval heads of
    a pre-trained model); any other starts fresh (a task's answer classifier). Unlisted heads
    are dropped. At another `image_size` the position embeddings are resampled to its patch
    grid with the kernel of the weights' source (`VisionConfig.pos_resample`), as X-VLM
    fine-tunes at a larger size than it pre-trains; the patch stem does not depend on the size.
    A model given a paired head (nlvr2, ta) when it had none has its fusion layers paired, one
    for each image (`paired_fusion`); one that had one keeps them as they are.
    """
    cfg = model.config.to_dict()
    cfg.update(heads=list(heads), pool=pool or cfg["pool"],
               num_answers=cfg["num_answers"] if num_answers is None else num_answers)
    pair = (any(h in PAIRED_HEADS for h in heads)
            and not any(h in PAIRED_HEADS for h in model.config.heads))
    if pair:
        cfg["fusion"] = asdict(paired_fusion(model.config.fusion))
    patch = cfg["vision"]["patch_size"]
    if image_size is not None and image_size != cfg["vision"]["image_size"]:
        if image_size % patch:
            raise ValueError(f"with_heads: patch size {patch} does not divide image size "
                             f"{image_size}")
        cfg["vision"]["image_size"] = image_size
    new = VLM(VLMConfig.from_dict(cfg))
    own = new.state_dict()
    state = model.state_dict()
    if pair:
        state = paired_fusion_state(state)
    vision = new.config.vision
    if vision.swin is None:  # a Swin has no absolute positions: its windows fit any grid
        state["vision.pos_embed"] = resample_pos_embed(state["vision.pos_embed"],
                                                       vision.image_size // patch,
                                                       vision.pos_resample)
    state = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in state]
    if any(not k.startswith("heads.") for k in missing):
        raise ValueError(f"with_heads: encoder tensor {missing[0]!r} did not carry over")
    new.load_state_dict(state, strict=False)
    return new
