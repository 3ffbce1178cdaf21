"""The resolved spec as frozen dataclasses: built once where a stage loads its params.

The library takes these typed configs, never the spec's dictionary. Field names follow the
spec's keys, so the schema (`evlm_cli/spec/spec.schema.json`) documents every one of them.
They have no defaults: the schema holds those, and a stage's params are always resolved, so
a missing key is an error rather than a second, silently different default. This module imports
neither torch nor anything below it: the command line and the compiler read it too.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from evlm_cli.core.packaged import local_path

# The three encoders of the X-VLM layout, in the order reports list them.
ENCODERS = ("vision", "text", "fusion")


@dataclass(frozen=True)
class PathKey:
    """A spec key that names a file or folder: validated by the spec loader, a DVC dependency
    of the stages whose sections hold it, and resolved when it names a packaged model."""

    key: tuple[str, ...]
    names: str  # what it names: "file", "directory", "file or directory"
    may_be_hub_id: bool = False  # a bare name that looks like a hub id gets its own hint
    may_be_packaged: bool = False  # `minilm` names the packaged all-MiniLM-L6-v2


PATH_KEYS = (
    PathKey(("pairs", "train"), "file"),
    PathKey(("pairs", "image_root"), "directory"),
    PathKey(("pairs", "tokenizer"), "directory", True, True),
    PathKey(("data", "train"), "file"),
    PathKey(("data", "val"), "file"),
    PathKey(("data", "test"), "file"),
    PathKey(("data", "image_root"), "directory"),
    PathKey(("data", "answer_list"), "file"),
    PathKey(("teacher", "checkpoint"), "file or directory", True),
    PathKey(("teacher", "init", "text"), "directory", True, True),
    PathKey(("teacher", "init", "vision"), "file or directory", True),
    PathKey(("task_teacher", "checkpoint"), "file or directory", True),
)


class ConfigError(ValueError):
    """A params dictionary that does not fit the typed config (a missing or unknown key)."""


@dataclass(frozen=True)
class OptimConfig:
    """One training run's optimiser and schedule (the spec's `<stage>.train` block)."""

    epochs: float
    batch_size: int
    lr: float
    weight_decay: float
    warmup_ratio: float
    grad_clip: float | None
    checkpoint_every: int
    max_steps: int | None
    answer_balance: float


@dataclass(frozen=True)
class LossWeights:
    """Weights of the task loss and the three distillation terms."""

    task: float
    logits: float
    hidden: float
    attention: float


@dataclass(frozen=True)
class Resources:
    processes: int
    nodes: int
    rendezvous: str | None  # host:port of torchrun's c10d rendezvous; None = the environment's
    launcher: str  # none | slurm: how a stage reaches the other nodes
    threads: int | None
    data_workers: int | None  # null = auto (`evlm_cli.data.loader.resolve_workers`)


@dataclass(frozen=True)
class DataConfig:
    """A task's dataset."""

    source: str
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    image_root: str | None
    answer_list: str | None
    image_size: int
    max_text_len: int
    limit: int | None
    val_fraction: float
    storage: str  # auto | memory | files (`evlm_cli.data.images`)
    skip_bad_images: bool
    caption_prompt: str  # captioning: put before every caption ("" = none)
    vqa_loss: str  # VQA: bce or soft_ce, recorded in the prepared meta for every training stage


@dataclass(frozen=True)
class PairsConfig:
    """The image-text pairs of task-agnostic pre-training and distillation, and the tokenizer."""

    source: str
    train: tuple[str, ...]
    image_root: str | None
    image_size: int
    max_text_len: int
    limit: int | None
    val_fraction: float
    tokenizer: str | None  # a local directory (`minilm` already resolved)
    vocab_size: int
    storage: str
    skip_bad_images: bool


@dataclass(frozen=True)
class RandAugmentConfig:
    ops: int
    magnitude: float


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation of the task's images (`evlm_cli.data.augment`)."""

    crop_scale: tuple[float, ...] | None
    flip: bool
    randaugment: RandAugmentConfig | None

    @property
    def enabled(self) -> bool:
        return self.crop_scale is not None or self.flip or self.randaugment is not None


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    width: int
    heads: int
    ffn: int
    norm: str | None = None  # text and fusion; the vision encoder is always pre-norm (a ViT)
    patch_size: int | None = None  # vision only
    stem: str | None = None  # vision only
    pos_init: str | None = None  # vision only
    activation: str | None = None  # vision only: None = as its weights' source says
    kind: str | None = None  # vision only: vit | swin
    depths: tuple[int, ...] | None = None  # vision only: a Swin's layers per stage
    window_size: int | None = None  # vision only: a Swin's window, in patches a side


@dataclass(frozen=True)
class TeacherInit:
    text: str | None  # a local HF BERT directory (`minilm` already resolved)
    vision: str | None
    fusion_from_text: bool
    lr_scale: float


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher's shape and where its weights come from: shared by every task."""

    vision: EncoderShape
    text: EncoderShape
    fusion: EncoderShape
    init: TeacherInit
    checkpoint: str | None  # a pre-trained teacher to import instead of pre-training one
    checkpoint_format: str
    embed_dim: int
    pool: str
    itm_head: str


@dataclass(frozen=True)
class PretrainWeights:
    itc: float
    itm: float
    mlm: float


@dataclass(frozen=True)
class PretrainConfig:
    """Task-agnostic pre-training of the teacher on the pairs."""

    weights: PretrainWeights
    mask_prob: float
    masking: str  # whole_words (X-VLM) | tokens (each token on its own)
    max_masks: int  # per caption, whole_words only
    mask_span_prob: float  # share of n-gram spans, whole_words only
    itc_negatives: str  # global (gathered over the processes, X-VLM) | local
    hard_negatives: float
    hard_negative_floor: float  # added to the ITM weights after the softmax (X-VLM: 1e-5)
    train: OptimConfig


@dataclass(frozen=True)
class TaskTeacherConfig:
    """The task teacher: fine-tuned from the pre-trained teacher, or imported finished."""

    checkpoint: str | None  # a finished task teacher, used as it is
    checkpoint_format: str  # evlm (a task model directory) | xvlm (X-VLM's fine-tuned file)
    lr_scale: float  # the pre-trained tensors' learning rate, as a share of train.lr
    label_smoothing: float  # captioning's LM loss
    train: OptimConfig


@dataclass(frozen=True)
class TextAssignmentConfig:
    """NLVR2's domain pre-training (X-VLM's text assignment) of the teacher, on the pairs."""

    lr_scale: float  # the pre-trained tensors' learning rate, as a share of train.lr
    hard_negatives: float  # the share of negatives drawn by image similarity, the rest evenly
    train: OptimConfig


@dataclass(frozen=True)
class LayerMap:
    vision: tuple[int, ...] | None
    text: tuple[int, ...] | None
    fusion: tuple[int, ...] | None


@dataclass(frozen=True)
class StudentConfig:
    vision_layers: int
    text_layers: int
    fusion_layers: int
    layer_map: LayerMap

    def layers(self) -> dict[str, int]:
        return {e: getattr(self, f"{e}_layers") for e in ENCODERS}


@dataclass(frozen=True)
class DistillConfig:
    train: OptimConfig
    enabled: bool
    temperature: float
    weights: LossWeights


@dataclass(frozen=True)
class PruneConfig:
    train: OptimConfig
    mode: str
    target_sparsity: float
    units: tuple[str, ...]
    warmup_fraction: float
    min_keep: float
    droprate_init: float
    gate_init: str
    gate_lr: float
    lagrangian_lr: float
    quadratic_penalty: float
    label_smoothing: float  # captioning's LM loss
    temperature: float
    weights: LossWeights


@dataclass(frozen=True)
class FinetuneConfig:
    train: OptimConfig
    label_smoothing: float  # captioning's LM loss, here and in the dense stage
    temperature: float
    weights: LossWeights


@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...]
    repeats: int
    warmup: int
    threads: int
    cpu: bool = False  # on CUDA, the CPU figures too


@dataclass(frozen=True)
class EvaluateConfig:
    metric: str
    batch_size: int
    k_test: int
    rerank: str
    beam_size: int
    max_len: int | None
    min_len: int
    beam_rule: str  # xvlm | fairseq (`evlm_cli.models.generate.beam_search`)
    block_special_tokens: bool
    latency: LatencyConfig


@dataclass(frozen=True)
class DenseConfig:
    epochs: float
    weights: LossWeights


@dataclass(frozen=True)
class ExportConfig:
    opset: int
    int8: bool


@dataclass(frozen=True)
class Params:
    """The sections of the resolved spec that one stage reads; the others stay None.

    A stage kind declares its sections in the registry (`evlm_cli.pipeline.registry`), and only those
    are built, so code that reads an undeclared section fails at once instead of reading a
    value DVC does not track.
    """

    name: str | None = None
    task: str | None = None
    seed: int | None = None
    seeds: tuple[int, ...] | None = None
    seed_scope: str | None = None
    shared_seed: int | None = None
    device: str | None = None
    precision: str | None = None  # auto | fp32 | bf16: the training stages' autocast
    resources: Resources | None = None
    pairs: PairsConfig | None = None
    data: DataConfig | None = None
    augment: AugmentConfig | None = None
    teacher: TeacherConfig | None = None
    pretrain: PretrainConfig | None = None
    text_assignment: TextAssignmentConfig | None = None
    task_teacher: TaskTeacherConfig | None = None
    student: StudentConfig | None = None
    distill: DistillConfig | None = None
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    dense: DenseConfig | None = None
    evaluate: EvaluateConfig | None = None
    export: ExportConfig | None = None




def build(cls: type, value: Any, where: str = "") -> Any:
    """A frozen dataclass (recursively) from a plain mapping, checked key by key."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown key {unknown[0]!r}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in value:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{_join(where, f.name)}: missing")
            continue
        kwargs[f.name] = _convert(hints[f.name], value[f.name], _join(where, f.name))
    return cls(**kwargs)


def params_from_dict(spec: dict, sections: tuple[str, ...] | None = None) -> Params:
    """Typed `Params` from a resolved spec (or a stage's subset of it).

    Names of packaged models become this machine's paths here, while params.yaml keeps the
    name, so shared-stage hashes agree between machines.
    """
    chosen = copy.deepcopy(spec if sections is None else {k: spec[k] for k in sections if k in spec})
    for path_key in PATH_KEYS:
        *parents, last = path_key.key
        node = chosen
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if path_key.may_be_packaged and isinstance(node, dict) and last in node:
            node[last] = local_path(node[last])
    return build(Params, chosen)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        if len(options) == 1:
            return _convert(options[0], value, where)
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin is tuple:
        (item_hint, *_), items = typing.get_args(hint), value
        if items is None:
            return ()
        items = items if isinstance(items, list | tuple) else [items]  # one file or several
        return tuple(_convert(item_hint, item, f"{where}[{i}]") for i, item in enumerate(items))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_dict(config: Any) -> Any:
    """A typed config back to plain data (lists for tuples), for hashing and JSON."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple | list):
        return [to_dict(v) for v in config]
    return config
