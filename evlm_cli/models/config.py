"""Model configuration: every encoder's shape is data, so a pruned model is just a config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from evlm_cli.core.config import ENCODERS  # noqa: F401  (re-exported: models speak of encoders too)

POOLS = ("cls", "max")


@dataclass
class EncoderConfig:
    """A stack of transformer layers; heads and FFN width may differ in every layer."""

    width: int
    head_dim: int
    heads: list[int]
    ffn: list[int]
    norm: str = "post"  # "post" (BERT) or "pre" (ViT)
    act: str = "gelu"  # "gelu", "gelu_tanh" or "quick_gelu"
    eps: float = 1e-12
    # Fusion layers only: heads of cross-attention to the image tokens, per layer.
    cross_heads: list[int] | None = None
    # Width of the tokens cross-attention reads (the vision width, as in X-VLM).
    kv_width: int | None = None

    def __post_init__(self) -> None:
        if len(self.heads) != len(self.ffn):
            raise ValueError(f"heads ({len(self.heads)}) and ffn ({len(self.ffn)}) list one entry per layer")
        if self.cross_heads is not None and len(self.cross_heads) != len(self.heads):
            raise ValueError("cross_heads lists one entry per layer")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"norm must be 'pre' or 'post', not {self.norm!r}")

    @property
    def layers(self) -> int:
        return len(self.heads)

    @property
    def has_cross(self) -> bool:
        return self.cross_heads is not None

    @classmethod
    def uniform(cls, width: int, layers: int, heads: int, ffn: int, *, cross: bool = False,
                kv_width: int | None = None, **kw) -> EncoderConfig:
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        return cls(width=width, head_dim=width // heads, heads=[heads] * layers, ffn=[ffn] * layers,
                   cross_heads=[heads] * layers if cross else None,
                   kv_width=(kv_width or width) if cross else None, **kw)

    def select(self, layer_ids: list[int]) -> EncoderConfig:
        """The config of the given layers of this stack, in order (student initialisation)."""
        pick = lambda xs: None if xs is None else [xs[i] for i in layer_ids]  # noqa: E731
        return EncoderConfig(width=self.width, head_dim=self.head_dim, heads=pick(self.heads),
                             ffn=pick(self.ffn), norm=self.norm, act=self.act, eps=self.eps,
                             cross_heads=pick(self.cross_heads), kv_width=self.kv_width)


@dataclass
class VisionConfig:
    encoder: EncoderConfig
    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    stem: str = "patch"  # "patch": one strided conv; "conv": a stack of 3x3 convs (Xiao et al. 2021)
    patch_bias: bool = True
    pre_norm: bool = False  # CLIP ViTs normalise the embeddings before the first block
    # How the learned position embeddings start: "normal", N(0, 0.02) as ViT; "sincos", the
    # 2-D sin-cos table of MAE (unit amplitude), which a model from scratch keeps and uses.
    pos_init: str = "normal"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    encoder: EncoderConfig
    vocab_size: int = 30522
    max_positions: int = 512
    type_vocab_size: int = 2
    pad_id: int = 0


@dataclass
class VLMConfig:
    vision: VisionConfig
    text: TextConfig
    fusion: EncoderConfig
    heads: list[str] = field(default_factory=lambda: ["itm", "itc"])
    num_answers: int = 0  # outputs of the "vqa" or "nlvr2" classifier: the task's answer list
    embed_dim: int = 256  # ITC projection width
    pool: str = "cls"  # what the task heads read: "cls" (the first fused token) or "max" (over tokens)

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, not {self.pool!r}")

    def encoder(self, name: str) -> EncoderConfig:
        return {"vision": self.vision.encoder, "text": self.text.encoder, "fusion": self.fusion}[name]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        v = dict(d["vision"])
        t = dict(d["text"])
        v["encoder"] = EncoderConfig(**v["encoder"])
        t["encoder"] = EncoderConfig(**t["encoder"])
        rest = {k: d[k] for k in d if k not in ("vision", "text", "fusion")}
        return cls(vision=VisionConfig(**v), text=TextConfig(**t),
                   fusion=EncoderConfig(**d["fusion"]), **rest)

    def with_encoders(self, vision: EncoderConfig, text: EncoderConfig,
                      fusion: EncoderConfig) -> VLMConfig:
        d = self.to_dict()
        d["vision"]["encoder"] = asdict(vision)
        d["text"]["encoder"] = asdict(text)
        d["fusion"] = asdict(fusion)
        return VLMConfig.from_dict(d)


def make_config(*, vision: dict, text: dict, fusion: dict, image_size: int, patch_size: int,
                vocab_size: int, max_positions: int = 512, stem: str = "patch",
                pos_init: str = "normal", heads: list[str] | None = None, num_answers: int = 0,
                embed_dim: int = 256, pool: str = "cls") -> VLMConfig:
    """A uniform config from per-encoder {layers, width, heads, ffn[, norm, eps, act]} (the spec's
    teacher; eps and act where a checkpoint it imports fixes them).

    The vision encoder is always pre-norm (ViT); text and fusion default to post-norm (BERT).
    """
    venc = EncoderConfig.uniform(vision["width"], vision["layers"], vision["heads"], vision["ffn"],
                                 norm="pre", eps=vision.get("eps", 1e-6), act=vision.get("act", "gelu"))
    tenc = EncoderConfig.uniform(text["width"], text["layers"], text["heads"], text["ffn"],
                                 norm=text.get("norm", "post"), eps=text.get("eps", 1e-12),
                                 act=text.get("act", "gelu"))
    fenc = EncoderConfig.uniform(fusion["width"], fusion["layers"], fusion["heads"], fusion["ffn"],
                                 cross=True, kv_width=vision["width"],
                                 norm=fusion.get("norm", "post"), eps=fusion.get("eps", 1e-12),
                                 act=fusion.get("act", "gelu"))
    return VLMConfig(vision=VisionConfig(venc, image_size=image_size, patch_size=patch_size, stem=stem,
                                         pos_init=pos_init),
                     text=TextConfig(tenc, vocab_size=vocab_size, max_positions=max_positions),
                     fusion=fenc, heads=heads or ["itm", "itc"], num_answers=num_answers,
                     embed_dim=embed_dim, pool=pool)
