"""The resolved spec as frozen dataclasses: built once where a stage loads its params.

The library takes these typed configs, never the spec's dictionary. Field names follow the
spec's keys, so `schemas/spec.schema.json` documents every one of them. This module imports
neither torch nor anything below it: the command line and the compiler read it too.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from evlm_cli.packaged import local_path

# The three encoders of the X-VLM layout, in the order reports list them.
ENCODERS = ("vision", "text", "fusion")


class ConfigError(ValueError):
    """A params dictionary that does not fit the typed config (a missing or unknown key)."""


@dataclass(frozen=True)
class OptimConfig:
    """One training run's optimiser and schedule (the spec's `<stage>.train` block)."""

    epochs: float = 1.0
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float | None = 1.0
    checkpoint_every: int = 200
    max_steps: int | None = None
    answer_balance: float = 0.0


@dataclass(frozen=True)
class LossWeights:
    """Weights of the task loss and the three distillation terms."""

    task: float = 1.0
    logits: float = 1.0
    hidden: float = 1.0
    attention: float = 1.0


@dataclass(frozen=True)
class Resources:
    processes: int = 1
    nodes: int = 1
    threads: int | None = None


@dataclass(frozen=True)
class DataConfig:
    source: str = "easy-vqa"
    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    image_root: str | None = None
    answer_list: str | None = None
    image_size: int = 64
    max_text_len: int = 32
    limit: int | None = None
    val_fraction: float = 0.1
    tokenizer: str | None = None  # a local directory (`minilm` already resolved)
    vocab_size: int = 2000


@dataclass(frozen=True)
class EncoderShape:
    layers: int
    width: int
    heads: int
    ffn: int
    norm: str = "post"
    patch_size: int | None = None  # vision only
    stem: str | None = None  # vision only


@dataclass(frozen=True)
class TeacherInit:
    text: str | None = None  # a local HF BERT directory (`minilm` already resolved)
    vision: str | None = None
    fusion_from_text: bool = False
    lr_scale: float = 0.1


@dataclass(frozen=True)
class TeacherConfig:
    vision: EncoderShape
    text: EncoderShape
    fusion: EncoderShape
    train: OptimConfig
    init: TeacherInit = field(default_factory=TeacherInit)
    checkpoint: str | None = None
    checkpoint_format: str = "evlm"
    pool: str = "cls"

    @property
    def imports_finished_model(self) -> bool:
        """An evlm checkpoint is a finished task model; anything else still trains."""
        return self.checkpoint is not None and self.checkpoint_format == "evlm"


@dataclass(frozen=True)
class LayerMap:
    vision: tuple[int, ...] | None = None
    text: tuple[int, ...] | None = None
    fusion: tuple[int, ...] | None = None


@dataclass(frozen=True)
class StudentConfig:
    vision_layers: int
    text_layers: int
    fusion_layers: int
    layer_map: LayerMap = field(default_factory=LayerMap)

    def layers(self) -> dict[str, int]:
        return {e: getattr(self, f"{e}_layers") for e in ENCODERS}


@dataclass(frozen=True)
class DistillConfig:
    train: OptimConfig
    enabled: bool = True
    temperature: float = 2.0
    weights: LossWeights = field(default_factory=LossWeights)


@dataclass(frozen=True)
class PruneConfig:
    train: OptimConfig
    mode: str = "modal-adaptive"
    target_sparsity: float = 0.5
    units: tuple[str, ...] = ("heads", "ffn")
    warmup_fraction: float = 0.5
    droprate_init: float = 0.5
    gate_lr: float = 0.1
    lagrangian_lr: float = 0.1
    temperature: float = 2.0
    weights: LossWeights = field(default_factory=LossWeights)


@dataclass(frozen=True)
class FinetuneConfig:
    train: OptimConfig
    temperature: float = 2.0
    weights: LossWeights = field(default_factory=LossWeights)


@dataclass(frozen=True)
class LatencyConfig:
    batch_sizes: tuple[int, ...] = (1, 32)
    repeats: int = 20
    warmup: int = 3
    threads: int = 2


@dataclass(frozen=True)
class EvaluateConfig:
    metric: str
    batch_size: int = 64
    latency: LatencyConfig = field(default_factory=LatencyConfig)


@dataclass(frozen=True)
class Params:
    """The sections of the resolved spec that one stage reads; the others stay None.

    A stage kind declares its sections in the registry (`evlm_cli.pipeline`), and only those
    are built, so code that reads an undeclared section fails at once instead of reading a
    value DVC does not track.
    """

    name: str | None = None
    task: str | None = None
    seed: int | None = None
    device: str | None = None
    resources: Resources | None = None
    data: DataConfig | None = None
    teacher: TeacherConfig | None = None
    student: StudentConfig | None = None
    distill: DistillConfig | None = None
    prune: PruneConfig | None = None
    finetune: FinetuneConfig | None = None
    evaluate: EvaluateConfig | None = None


# Values that name packaged files: resolved to this machine's paths when typed, while
# params.yaml keeps the name, so shared-stage hashes agree between machines.
_LOCAL_PATH_FIELDS = {(DataConfig, "tokenizer"), (TeacherInit, "text")}


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
        item = _convert(hints[f.name], value[f.name], _join(where, f.name))
        if (cls, f.name) in _LOCAL_PATH_FIELDS:
            item = local_path(item)
        kwargs[f.name] = item
    return cls(**kwargs)


def params_from_dict(spec: dict, sections: tuple[str, ...] | None = None) -> Params:
    """Typed `Params` from a resolved spec (or a stage's subset of it)."""
    chosen = spec if sections is None else {k: spec[k] for k in sections if k in spec}
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
