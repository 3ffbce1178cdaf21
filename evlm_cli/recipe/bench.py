"""`evlm bench`: finished runs timed again in one process, interleaved, as evaluate times them.

Evaluate times wherever its stage happens to run, beside whatever else runs there (other
stages of a sweep, a test suite). Bench loads each run's teacher, dense student, student and
exported files and times all of them in the same rounds, with the runs' own threads and batch
sizes, and records how loaded the machine was while it did.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from evlm_cli.core.config import Params
from evlm_cli.core.errors import EvlmError
from evlm_cli.core.io import atomic_write_json
from evlm_cli.core.results import BenchResults, EvaluateResults, Latency
from evlm_cli.data.loader import PreparedData, open_prepared
from evlm_cli.models.checkpoint import load_model
from evlm_cli.recipe.evaluate import (
    EVAL_SEED,
    TEACHER_ONNX,
    exported_models,
    exported_speedups,
    latency_report,
    onnx_teacher,
    speedup_split,
    timed_sets,
)
from evlm_cli.recipe.student import task_student
from evlm_cli.training.loop import setup

# The models of one run, as evaluate names their rows.
ROLES = ("teacher", "dense_student", "student")


@dataclass(frozen=True, kw_only=True)
class Benched:
    """One finished run to time again: its params (task, device, resources, evaluate), the
    files its evaluate stage read (named as that stage's inputs), the results that stage
    wrote and their digest, and where its bench results go."""

    name: str
    params: Params
    prepared: Path
    teacher: Path
    student: Path
    dense: Path  # the distilled student (timed as evaluate built it when no dense stage ran)
    dense_model: Path | None = None  # the dense stage's model
    onnx: Path | None = None
    teacher_metrics: Path | None = None  # read by evaluate, not by bench
    masks: Path | None = None
    results: EvaluateResults
    evaluate_sha256: str
    out: Path


def bench(runs: list[Benched]) -> dict[str, BenchResults]:
    """Time every run's models in the same rounds; write and return each run's results.

    A model two runs share (a sweep's one task teacher) is timed once for both. The runs must
    agree on the threads to time with; the batch sizes timed are all of theirs, and each run
    keeps its own.
    """
    first = runs[0].params
    threads = {r.params.evaluate.latency.threads for r in runs}
    if len(threads) > 1:
        raise EvlmError("evlm bench: the runs time with different evaluate.latency.threads "
                        f"({', '.join(f'{r.name}: {r.params.evaluate.latency.threads}' for r in runs)}); "
                        "bench them separately")
    device = setup(EVAL_SEED, first.resources.threads, first.device)
    latency_cfg = dataclasses.replace(
        first.evaluate.latency,
        batch_sizes=tuple(sorted({bs for r in runs for bs in r.params.evaluate.latency.batch_sizes})),
        repeats=max(r.params.evaluate.latency.repeats for r in runs),
        warmup=max(r.params.evaluate.latency.warmup for r in runs),
        cpu=any(r.params.evaluate.latency.cpu for r in runs))
    models, onnx, data_of, task_of, keys = {}, {}, {}, {}, []
    for run in runs:
        data = open_prepared(run.prepared, run.params.resources)
        task = run.params.task
        own = {}
        teacher = load_model(run.teacher).eval()
        paths = {"teacher": run.teacher, "student": run.student,
                 "dense_student": run.dense_model or run.dense}
        for role in ROLES:
            key = f"{role}:{paths[role]}:{task}"
            own[role] = key
            if key in models:
                continue
            if role == "teacher":
                models[key] = teacher
            elif role == "dense_student" and run.dense_model is None:
                models[key] = task_student(run.dense, teacher, task, data).eval()
            else:
                models[key] = load_model(paths[role]).eval()
            data_of[key], task_of[key] = data, task
        if run.onnx is not None:
            threads_used = run.params.evaluate.latency.threads
            for name, model in exported_models(run.onnx, threads_used).items():
                own[name] = key = f"{name}:{run.onnx}"
                onnx[key], data_of[key] = model, data
            key = f"{TEACHER_ONNX}:{run.teacher}:{task}"
            own[TEACHER_ONNX] = key
            if key not in onnx:
                onnx[key] = onnx_teacher(teacher, task, data, run.onnx, threads_used)
                data_of[key] = data
        keys.append(own)
    sets = timed_sets(models, task_of, device, onnx, latency_cfg)
    latency, timing = latency_report(sets, PreparedData(runs[0].prepared), latency_cfg,
                                     taken_by="bench", data_of=data_of)
    out = {}
    for run, own in zip(runs, keys, strict=True):
        asked = set(run.params.evaluate.latency.batch_sizes)
        mine = {setting: {role: ms[key] for role, key in own.items()}
                for setting, ms in latency.items() if _batch_of(setting) in asked}
        r = run.results
        gflops = {"teacher": r.teacher.size.gflops_per_example,
                  "dense_student": r.dense.size.gflops_per_example,
                  "student": r.student.size.gflops_per_example}
        flops_ratio = gflops["teacher"] / gflops["student"]
        exported = {}
        for name in r.exported:
            speedups = exported_speedups(mine, name)
            speedups["over_flops_ratio"] = {bs: v / flops_ratio
                                            for bs, v in speedups["speedup"].items()}
            exported[name] = speedups
        results = BenchResults(
            evaluate_sha256=run.evaluate_sha256, benched_with=tuple(x.name for x in runs),
            latency_ms={s: Latency(**ms) for s, ms in mine.items()},
            speedup=speedup_split(mine, gflops), exported=exported, timing=timing)
        atomic_write_json(run.out, results.to_json())
        out[run.name] = results
    return out


def _batch_of(setting: str) -> int:
    """The batch size of a latency row's name: batch_32, batch_32_bf16, cpu_batch_32."""
    return int(setting.split("batch_")[1].split("_")[0])
