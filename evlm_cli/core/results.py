"""The results contract: what the teacher_eval and evaluate stages write as metrics.json, typed
and versioned, so every reader (diff, show, plots, the run summary, DVC) reads one shape.

Each file carries `schema_version`. A file of another version is refused with the rerun that
rewrites it; there are no readers of older shapes. Numbers are JSON leaves and absent figures
null, so `dvc metrics show` and `dvc metrics diff` read the files as they are.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from evlm_cli.core.errors import EvlmError

Result = TypeVar("Result")

# Raise it with any change a reader would notice: a field added, renamed, retyped or moved.
SCHEMA_VERSION = 4


class Versioned:
    """A results file's reading and writing: every field written, the version checked first."""

    STAGE: ClassVar[str]  # the stage that writes the file, named in the rerun advice

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls: type[Result], data: Any, where: str, run: str = "the run",
                  fix: str | None = None) -> Result:
        """`fix`, when given, replaces the rerun advice (a run read at a git revision)."""
        return _from_json(cls, data, where, fix or rerun(run, cls.STAGE))

    @classmethod
    def read(cls: type[Result], path: Path, run: str = "the run") -> Result:
        return cls.from_json(_read_json(path), str(path), run)


@dataclass(frozen=True)
class Size:
    """How big one model is."""

    params: int
    gflops_per_example: float
    size_bytes: int | None  # its saved weights; None for a model evaluate builds in memory


@dataclass(frozen=True)
class Score:
    """A model's task metric on the test split, with the task's other measures."""

    value: float | None  # the headline metric evaluate.metric names; None when not scored
    unscored: str | None = None  # why not: the test split has no answers (test-dev)
    by_answer_type: dict[str, float] | None = None  # VQA, where the data gives answer types
    recall: dict[str, float] | None = None  # retrieval: tr_r1 ... ir_r10, r_mean
    caption: dict[str, float] | None = None  # captioning: bleu_4, meteor, rouge_l, cider


@dataclass(frozen=True)
class Timing:
    """How a results file's latencies were taken, so a reader can tell a figure timed alone
    from one timed beside other work. `others_busy_*` are the cores other processes kept busy
    in the second before timing and while it ran; `contended` says they left fewer free cores
    than the timing's threads."""

    taken_by: str  # "evaluate" (the stage, wherever it ran) or "bench" (`evlm bench`)
    device: str  # what ran the PyTorch models: "cpu", or the CUDA device's name
    threads: int  # torch's and ONNX Runtime's intra-op threads while timing
    cores: int  # logical CPUs the process could run on
    repeats: int
    warmup: int
    others_busy_before: float
    others_busy_during: float
    contended: bool


@dataclass(frozen=True)
class TeacherResults(Versioned):
    """What teacher_eval writes: the task teacher, scored, sized and timed alone."""

    schema_version: int = field(default=SCHEMA_VERSION, kw_only=True)
    metric: str
    score: Score
    size: Size
    params_by_part: dict[str, int]  # embeddings, vision, text, fusion, heads, total
    prunable_params: dict[str, int]  # per encoder, and total
    latency_ms: dict[str, float]  # batch_N -> median ms of one pass
    timing: Timing

    STAGE: ClassVar[str] = "teacher_eval"


@dataclass(frozen=True)
class Teacher:
    """The task teacher, as teacher_eval measured it."""

    score: Score
    size: Size


@dataclass(frozen=True)
class Dense:
    """The student before pruning: what depth alone gives."""

    value: float | None  # None when no dense stage trained it on the task: timed, not scored
    retention: float | None
    size: Size


@dataclass(frozen=True)
class Student:
    """The pruned, fine-tuned student."""

    score: Score
    retention: float | None  # its value over the teacher's; None when either is not scored
    size: Size
    params_by_part: dict[str, int]


@dataclass(frozen=True)
class Latency:
    """Median ms of one pass at one batch size, every model interleaved in one process."""

    teacher: float
    dense_student: float
    student: float
    # The exported student files, and the teacher exported the same way, when exported.
    onnx_fp32: float | None = None
    onnx_int8: float | None = None
    teacher_onnx_fp32: float | None = None


@dataclass(frozen=True)
class Speedup:
    """The student's speedup over the teacher at one batch size, split into depth (teacher /
    dense student) and pruning (dense / pruned student), whose product is the total; each over
    its FLOPs ratio, 1.0 when a model runs as fast as its arithmetic allows."""

    total: float
    depth: float
    pruning: float
    depth_over_flops_ratio: float
    pruning_over_flops_ratio: float
    over_flops_ratio: float


@dataclass(frozen=True)
class Generation:
    """Median ms to write a whole caption per image of a batch, teacher next to student."""

    teacher_ms: float
    student_ms: float
    speedup: float


@dataclass(frozen=True)
class Sparsity:
    """The share of the prunable parameters removed, overall and per encoder (None: the
    encoder had no units to prune)."""

    overall: float
    vision: float | None
    text: float | None
    fusion: float | None
    # where training's expected sparsity ended (overall), and the share of units (heads,
    # neurons) that the final selection, which meets the target exactly, decided against the
    # gates; None without gates (prune.mode none)
    expected_at_end: float | None
    overruled_share: float | None


@dataclass(frozen=True)
class Exported:
    """One exported student file in ONNX Runtime (the int8 row never stands in for fp32)."""

    runtime: str
    value: float | None  # None when the test split is not scored
    retention: float | None
    retention_of_student: float | None
    size_bytes: int
    speedup: dict[str, float]  # batch_N -> over the teacher exported the same way
    over_flops_ratio: dict[str, float]  # that speedup over the FLOPs ratio
    speedup_over_pytorch_teacher: dict[str, float]
    # over the teacher's fastest runtime at that batch size (PyTorch or ONNX Runtime): the
    # teacher a user would deploy instead
    speedup_over_fastest_teacher: dict[str, float]


@dataclass(frozen=True)
class EvaluateResults(Versioned):
    """What evaluate writes: teacher, dense student and student side by side."""

    schema_version: int = field(default=SCHEMA_VERSION, kw_only=True)
    metric: str
    teacher: Teacher
    dense: Dense
    student: Student
    # batch_N -> per model, on the spec's device in fp32; on CUDA also batch_N_bf16 (bf16
    # autocast) and, where asked or exported, cpu_batch_N (the ONNX files are timed there)
    latency_ms: dict[str, Latency]
    speedup: dict[str, Speedup]  # as latency_ms
    generation: dict[str, Generation] | None  # batch_N -> whole captions; captioning only
    sparsity: Sparsity
    warnings: tuple[str, ...]  # what the prune stage warned of
    exported: dict[str, Exported]  # onnx_fp32, onnx_int8: the export stage's files, if any
    timing: Timing

    STAGE: ClassVar[str] = "evaluate"


@dataclass(frozen=True)
class BenchResults(Versioned):
    """What `evlm bench` writes beside a finished run (`runs/NAME/bench.json`): the run's
    timings taken again, alone and interleaved with the other runs benched with it. Readers
    show them in place of evaluate's while `evaluate_sha256` is the hash of the evaluate
    results they were taken for. Not a DVC output: DVC would rerun evaluate over a changed
    metrics file and take its figures back."""

    schema_version: int = field(default=SCHEMA_VERSION, kw_only=True)
    evaluate_sha256: str
    benched_with: tuple[str, ...]  # the runs timed in the same rounds
    latency_ms: dict[str, Latency]
    speedup: dict[str, Speedup]
    # file -> {"speedup", "over_flops_ratio", "speedup_over_pytorch_teacher",
    # "speedup_over_fastest_teacher"} -> batch_N -> value, as `Exported` names them
    exported: dict[str, dict[str, dict[str, float]]]
    timing: Timing

    STAGE: ClassVar[str] = "bench"


def retimed(results: EvaluateResults, bench: BenchResults) -> EvaluateResults:
    """`results` with `bench`'s timings in place of evaluate's: latencies, speedups and how
    they were taken."""
    exported = {name: replace(e, **bench.exported[name]) if name in bench.exported else e
                for name, e in results.exported.items()}
    return replace(results, latency_ms=bench.latency_ms, speedup=bench.speedup,
                   exported=exported, timing=bench.timing)


def rerun(run: str, stage: str) -> str:
    """The command that rewrites a stage's results in the current schema. A new evlm changes
    the stage's code fingerprint, so DVC reruns the stage."""
    return f"rerun `evlm run SPEC` for {run} (the {stage} stage reruns)"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise EvlmError(f"{path}: invalid JSON ({e})") from None



def _from_json(cls: type[Result], data: Any, where: str, fix: str) -> Result:
    """`data` as a `cls`; a file of another schema version, or a field missing or of the
    wrong type, is one line naming `where`."""
    found = data.get("schema_version") if isinstance(data, dict) else None
    if found != SCHEMA_VERSION or isinstance(found, bool):
        written = "no schema_version" if found is None else f"schema_version {found!r}"
        raise EvlmError(f"{where}: results with {written}, expected {SCHEMA_VERSION} "
                        f"(written by another evlm version): {fix}")
    return _decode(cls, data, where, "")


def _decode(kind: Any, value: Any, where: str, key: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _decode(inner, value, where, key)
    if is_dataclass(kind):
        if not isinstance(value, dict):
            _wrong(where, key, "an object", value)
        hints = typing.get_type_hints(kind)
        known = {f.name for f in fields(kind)}
        extra = sorted(set(value) - known)
        if extra:
            raise EvlmError(f"{where}: unknown field {_join(key, extra[0])} in the results")
        out = {}
        for f in fields(kind):
            if f.name not in value:  # the writer writes every field, null where absent
                raise EvlmError(f"{where}: field {_join(key, f.name)} is missing from the "
                                "results")
            out[f.name] = _decode(hints[f.name], value[f.name], where, _join(key, f.name))
        return kind(**out)
    if origin is dict:
        if not isinstance(value, dict):
            _wrong(where, key, "an object", value)
        return {k: _decode(args[1], v, where, _join(key, k)) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            _wrong(where, key, "a list", value)
        return tuple(_decode(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _wrong(where, key, "a number", value)
        return float(value)
    if kind is bool:
        if not isinstance(value, bool):
            _wrong(where, key, "true or false", value)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong(where, key, "an integer", value)
        return value
    if kind is str:
        if not isinstance(value, str):
            _wrong(where, key, "a string", value)
        return value
    raise TypeError(f"the results contract has no reader for {kind!r}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _wrong(where: str, key: str, expected: str, value: Any) -> typing.NoReturn:
    raise EvlmError(f"{where}: field {key or '(top level)'} should be {expected}, "
                    f"found {json.dumps(value)[:60]}")
