"""Model configuration: every encoder's shape is data, so a pruned model is just a config."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from evlm_cli.core.config import ENCODERS  # noqa: F401  (re-exported: models speak of encoders too)

POOLS = ("cls", "max")
ITM_HEADS = ("mlp", "linear")
POS_RESAMPLE = ("bicubic_antialias", "bicubic")


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
class SwinConfig:
    """The stages of a Swin vision encoder (Liu et al. 2021), as X-VLM's released checkpoints
    have them.

    Stage s works on the patch grid halved s times (patch merging between stages), at 2**s
    times the first stage's width, and attends within square windows. The vision encoder's
    EncoderConfig lists the layers of every stage in order and carries the last stage's
    width, so a shallower or pruned Swin is an ordinary Swin with an unusual config.
    """

    depths: list[int]  # layers per stage
    window_size: int = 7  # patches a side; a stage whose grid is smaller uses the whole grid
    # Per layer: whether its windows shift by half a window. Swin shifts every other layer of a
    # stage; a student keeps each teacher layer's, so its weights see the windows they learnt.
    shifted: list[bool] | None = None

    def __post_init__(self) -> None:
        if not self.depths or min(self.depths) < 0 or self.window_size < 1:
            raise ValueError(f"a Swin needs stage depths >= 0 and a window >= 1, got depths "
                             f"{self.depths} and window {self.window_size}")
        if self.shifted is None:
            self.shifted = [j % 2 == 1 for depth in self.depths for j in range(depth)]
        if len(self.shifted) != sum(self.depths):
            raise ValueError(f"shifted lists one entry per layer ({sum(self.depths)}), "
                             f"not {len(self.shifted)}")

    @property
    def stages(self) -> int:
        return len(self.depths)

    def layer_stages(self) -> list[int]:
        """The stage of each layer, in order."""
        return [stage for stage, depth in enumerate(self.depths) for _ in range(depth)]

    def select(self, layer_ids: list[int]) -> SwinConfig:
        """The stages of the given layers (student initialisation): every stage stays, with the
        layers picked from it; the layers must keep their stages' order."""
        stages = self.layer_stages()
        picked = [stages[i] for i in layer_ids]
        if picked != sorted(picked):
            raise ValueError(f"Swin layers {list(layer_ids)} are not in stage order (stages "
                             f"{picked}): a layer only fits the stage whose width it has")
        return SwinConfig(depths=[picked.count(s) for s in range(self.stages)],
                          window_size=self.window_size,
                          shifted=[self.shifted[i] for i in layer_ids])


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
    # How the position embeddings are resampled to another patch grid: as the code of the
    # weights' source does it, so that importing and changing the image size give what that
    # code gives. "bicubic_antialias": timm's ViTs (and evlm's own); "bicubic": X-VLM's
    # `interpolate_pos_embed`, and transformers' CLIP.
    pos_resample: str = "bicubic_antialias"

    # A Swin encoder's stages; None: a ViT.
    swin: SwinConfig | None = None

    def __post_init__(self) -> None:
        if self.pos_resample not in POS_RESAMPLE:
            raise ValueError(f"pos_resample must be one of {POS_RESAMPLE}, not {self.pos_resample!r}")
        if self.swin is not None:
            self._check_swin()

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def kind(self) -> str:
        return "vit" if self.swin is None else "swin"

    # --- Swin geometry (a ViT is one stage at its full width, without windows) ---

    def stage_grid(self, stage: int) -> int:
        """Patches a side in a stage."""
        return self.image_size // self.patch_size // 2 ** stage

    def stage_window(self, stage: int) -> int:
        """Patches a side of a stage's windows: Swin's size, or the whole grid when that is
        smaller (Swin's rule, which also stops such a stage from shifting)."""
        return min(self.swin.window_size, self.stage_grid(stage))

    def layer_widths(self) -> list[int]:
        """The width of each vision layer."""
        if self.swin is None:
            return [self.encoder.width] * self.encoder.layers
        first = self.encoder.width // 2 ** (self.swin.stages - 1)
        return [first * 2 ** stage for stage in self.swin.layer_stages()]

    def bias_table_rows(self) -> list[int]:
        """Rows of each vision layer's relative position bias table (one column per head; a
        ViT has none): one row per offset between two patches of a window."""
        if self.swin is None:
            return [0] * self.encoder.layers
        return [(2 * self.stage_window(stage) - 1) ** 2 for stage in self.swin.layer_stages()]

    def _check_swin(self) -> None:
        swin, enc = self.swin, self.encoder
        if enc.layers != sum(swin.depths):
            raise ValueError(f"the Swin stages hold {sum(swin.depths)} layers, the encoder "
                             f"config {enc.layers}")
        if enc.width % 2 ** (swin.stages - 1) or self.stem != "patch":
            raise ValueError(f"a Swin's last width ({enc.width}) doubles its first "
                             f"{swin.stages - 1} times, and its stem is one patch convolution")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide image size "
                             f"{self.image_size}")
        for stage in range(swin.stages):
            grid, window = self.stage_grid(stage), self.stage_window(stage)
            merged = stage < swin.stages - 1 and grid % 2
            if grid < 1 or merged or grid % window:
                raise ValueError(
                    f"Swin stage {stage}: a {self.image_size}-pixel image gives a grid of "
                    f"{self.image_size // self.patch_size / 2 ** stage:g} patches a side, which "
                    f"must be whole, even before patch merging, and tiled by windows of {window}")


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
    num_answers: int = 0  # the task's answer list: outputs of the "vqa" classifier (NLVR2's: 2)
    embed_dim: int = 256  # ITC projection width
    pool: str = "cls"  # what the task heads read: "cls" (the first fused token) or "max" (over tokens)
    itm_head: str = "mlp"  # X-VLM's MLP, or one Linear (a model trained here may choose it)

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, not {self.pool!r}")
        if self.itm_head not in ITM_HEADS:
            raise ValueError(f"itm_head must be one of {ITM_HEADS}, not {self.itm_head!r}")

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
        if v.get("swin") is not None:
            v["swin"] = SwinConfig(**v["swin"])
        t["encoder"] = EncoderConfig(**t["encoder"])
        rest = {k: d[k] for k in d if k not in ("vision", "text", "fusion")}
        return cls(vision=VisionConfig(**v), text=TextConfig(**t),
                   fusion=EncoderConfig(**d["fusion"]), **rest)

    def with_encoders(self, vision: EncoderConfig, text: EncoderConfig,
                      fusion: EncoderConfig, swin: SwinConfig | None = None) -> VLMConfig:
        """The same model with other encoder shapes; `swin`: a Swin's stages for a vision
        encoder with other layers (a student's)."""
        d = self.to_dict()
        d["vision"]["encoder"] = asdict(vision)
        if swin is not None:
            d["vision"]["swin"] = asdict(swin)
        d["text"]["encoder"] = asdict(text)
        d["fusion"] = asdict(fusion)
        return VLMConfig.from_dict(d)


def make_config(*, vision: dict, text: dict, fusion: dict, image_size: int, patch_size: int,
                vocab_size: int, max_positions: int = 512, stem: str = "patch",
                pos_init: str = "normal", heads: list[str] | None = None, num_answers: int = 0,
                embed_dim: int = 256, pool: str = "cls", itm_head: str = "mlp") -> VLMConfig:
    """A uniform config from per-encoder {layers, width, heads, ffn[, norm, eps, act]} (the spec's
    teacher; eps and act where a checkpoint it imports fixes them).

    The vision encoder is always pre-norm (ViT); text and fusion default to post-norm (BERT).
    A vision {kind: "swin", depths, window_size} is a Swin whose first stage has the given
    width, heads and FFN width (`swin_encoder`).
    """
    swin = None
    if vision.get("kind", "vit") == "swin":
        venc, swin = swin_encoder(vision)
    else:
        venc = EncoderConfig.uniform(vision["width"], vision["layers"], vision["heads"],
                                     vision["ffn"], norm="pre", eps=vision.get("eps", 1e-6),
                                     act=vision.get("act", "gelu"))
    tenc = EncoderConfig.uniform(text["width"], text["layers"], text["heads"], text["ffn"],
                                 norm=text.get("norm", "post"), eps=text.get("eps", 1e-12),
                                 act=text.get("act", "gelu"))
    fenc = EncoderConfig.uniform(fusion["width"], fusion["layers"], fusion["heads"], fusion["ffn"],
                                 cross=True, kv_width=venc.width,
                                 norm=fusion.get("norm", "post"), eps=fusion.get("eps", 1e-12),
                                 act=fusion.get("act", "gelu"))
    return VLMConfig(vision=VisionConfig(venc, image_size=image_size, patch_size=patch_size, stem=stem,
                                         pos_init=pos_init, swin=swin),
                     text=TextConfig(tenc, vocab_size=vocab_size, max_positions=max_positions),
                     fusion=fenc, heads=heads or ["itm", "itc"], num_answers=num_answers,
                     embed_dim=embed_dim, pool=pool, itm_head=itm_head)


def swin_encoder(vision: dict) -> tuple[EncoderConfig, SwinConfig]:
    """A Swin's layers from {layers, width, heads, ffn, depths, window_size[, eps, act]}: the
    first stage's width, heads and FFN width, each doubled at every later stage as Swin does
    (so every head keeps one size). Swin's LayerNorms use torch's default eps."""
    depths = list(vision.get("depths") or [])
    if not depths:
        raise ValueError("a Swin needs its layers per stage (depths)")
    if vision.get("layers", sum(depths)) != sum(depths):
        raise ValueError(f"a Swin with stages {depths} has {sum(depths)} layers, not "
                         f"{vision['layers']}")
    width, heads = vision["width"], vision["heads"]
    if width % heads:
        raise ValueError(f"width {width} is not divisible by {heads} heads")
    stages = [stage for stage, depth in enumerate(depths) for _ in range(depth)]
    encoder = EncoderConfig(width=width * 2 ** (len(depths) - 1), head_dim=width // heads,
                            heads=[heads * 2 ** s for s in stages],
                            ffn=[vision["ffn"] * 2 ** s for s in stages], norm="pre",
                            eps=vision.get("eps", 1e-5), act=vision.get("act", "gelu"))
    return encoder, SwinConfig(depths=depths, window_size=vision.get("window_size", 7))
