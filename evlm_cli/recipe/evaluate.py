"""Evaluation stages: the task metric, size, FLOPs, and latency measured next to the teacher."""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from evlm_cli.compress.measure import (
    contended,
    count_flops,
    load_before,
    machine_cores,
    measure_latency,
    watched_load,
)
from evlm_cli.core.config import ENCODERS, EvaluateConfig, LatencyConfig, Params
from evlm_cli.core.io import atomic_write_json
from evlm_cli.core.layout import MODEL_WEIGHTS
from evlm_cli.core.results import (
    Dense,
    EvaluateResults,
    Exported,
    Generation,
    Latency,
    Score,
    Size,
    Sparsity,
    Speedup,
    Student,
    Teacher,
    TeacherResults,
    Timing,
)
from evlm_cli.data.loader import PreparedData, open_prepared
from evlm_cli.deploy.onnx import FP32_FILE, INT8_FILE, OnnxModel, export_onnx
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.generate import greedy_decode
from evlm_cli.models.vlm import (
    VLM,
    TaskLogits,
    for_inference,
    param_breakdown,
    prunable_param_count,
)
from evlm_cli.recipe.scoring import (
    Forward,
    classification_report,
    decoder_ids,
    evaluate_report,
    fixed_batch,
)
from evlm_cli.recipe.student import task_student
from evlm_cli.tasks import TASKS
from evlm_cli.training.loop import setup

# Evaluation draws nothing at random; its params carry no seed.
EVAL_SEED = 0
# An end token no model can produce: timed captions all run to full length.
NO_TOKEN = -1
# The latency row of the teacher exported to ONNX, timed next to the exported student.
TEACHER_ONNX = "teacher_onnx_fp32"


def size_report(model: VLM, model_dir: Path, data: PreparedData) -> dict:
    """Parameters, FLOPs per example and the size of the saved weights of one model."""
    inputs = fixed_batch(data, 1)
    return {"params": param_breakdown(model), "prunable_params": prunable_param_count(model.config),
            "gflops_per_example": count_flops(model, *inputs) / 1e9,
            "size_bytes": (Path(model_dir) / MODEL_WEIGHTS).stat().st_size}


@dataclass(frozen=True)
class TimedSet:
    """Models timed together in one setting: on `device`, in bf16 autocast or not. Its rows
    are named `prefix + "batch_N" + suffix` in the results."""

    models: dict[str, Forward]
    device: torch.device
    bf16: bool = False
    prefix: str = ""
    suffix: str = ""


def timed_sets(models: dict[str, VLM], task: str | dict[str, str], device: torch.device,
               onnx: dict[str, Forward], latency_cfg: LatencyConfig) -> list[TimedSet]:
    """The settings a model set is timed in: the spec's device in fp32 (with the ONNX files on
    a CPU spec); on CUDA also bf16 autocast, and the CPU beside it (with the ONNX files) where
    `latency.cpu` asks or files were exported. `models` are timed as they run fastest, each
    the same way (`for_inference`), on `task`, or each on its own where it is a mapping."""
    task_of = task if isinstance(task, dict) else dict.fromkeys(models, task)
    fast = {name: for_inference(model) for name, model in models.items()}
    on_device = {name: TaskLogits(model.to(device), task_of[name])
                 for name, model in fast.items()}
    if device.type != "cuda":
        return [TimedSet({**on_device, **onnx}, device)]
    sets = [TimedSet(on_device, device), TimedSet(on_device, device, bf16=True, suffix="_bf16")]
    if latency_cfg.cpu or onnx:
        on_cpu = {name: TaskLogits(copy.deepcopy(model).cpu(), task_of[name])
                  for name, model in fast.items()}
        sets.append(TimedSet({**on_cpu, **onnx}, torch.device("cpu"), prefix="cpu_"))
    return sets


def latency_report(sets: list[TimedSet], data: PreparedData, latency_cfg: LatencyConfig,
                   taken_by: str = "evaluate",
                   data_of: dict[str, PreparedData] | None = None) -> tuple[dict, Timing]:
    """Median latency (ms) of the task logits per model, setting and batch size, the models of
    a setting interleaved in one process (PyTorch and ONNX Runtime alike, with the same
    threads), and how it was taken: the cores other processes kept busy before and during.
    Each model runs on the test examples of `data`, or of its own in `data_of`."""
    before = load_before()
    during, out = 0.0, {}
    data_of = data_of or {}
    for timed in sets:
        for bs in latency_cfg.batch_sizes:
            batches = {id(d): tuple(t.to(timed.device) for t in fixed_batch(d, bs))
                       for d in {id(d): d for d in [data, *data_of.values()]}.values()}
            inputs = {name: batches[id(data_of.get(name, data))] for name in timed.models}
            calls = {name: (lambda f=f, x=inputs[name]: f(*x))
                     for name, f in timed.models.items()}
            with watched_load() as load:
                res = measure_latency(calls, repeats=latency_cfg.repeats,
                                      warmup=latency_cfg.warmup, threads=latency_cfg.threads,
                                      device=timed.device, bf16=timed.bf16)
            during = max(during, load.others_busy_cores)
            out[f"{timed.prefix}batch_{bs}{timed.suffix}"] = {name: r["median_ms"]
                                                             for name, r in res.items()}
    cores = machine_cores()
    timing = Timing(taken_by=taken_by, device=device_name(sets[0].device),
                    threads=latency_cfg.threads, cores=cores, repeats=latency_cfg.repeats,
                    warmup=latency_cfg.warmup, others_busy_before=before.others_busy_cores,
                    others_busy_during=during,
                    contended=contended(max(before.others_busy_cores, during),
                                        latency_cfg.threads, cores))
    return out, timing


def device_name(device: torch.device) -> str:
    """"cpu", or the CUDA device's own name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def test_report(model: VLM, data: PreparedData, task: str, ev: EvaluateConfig,
                device: torch.device) -> dict:
    """The task metric on the test split, as the evaluate section asks for it."""
    return evaluate_report(model, data, "test", task, ev.batch_size, device, ev.k_test,
                           metric=ev.metric, beam_size=ev.beam_size, max_len=ev.max_len,
                           rerank=ev.rerank, min_len=ev.min_len, beam_rule=ev.beam_rule,
                           block_special_tokens=ev.block_special_tokens)


def generation_report(models: dict[str, VLM], data: PreparedData, ev: EvaluateConfig) -> dict:
    """Median ms to write a caption for each image of a batch (greedy, KV cache), per batch
    size, the models interleaved. No caption ends early, so every model writes the same number
    of tokens (`evaluate.max_len`) and the times compare like for like."""
    ids = {**decoder_ids(data, ev.max_len), "eos_id": NO_TOKEN}
    # Timed on the same fixed batches as one pass: the images only, the text unread.
    writers = {name: (lambda images, input_ids, mask, m=m: greedy_decode(m, images, **ids))
               for name, m in models.items()}
    return latency_report([TimedSet(writers, torch.device("cpu"))], data, ev.latency)[0]


def score_of(scores: dict) -> Score:
    """`test_report`'s figures as the results contract holds them."""
    return Score(value=scores["value"], unscored=scores.get("unscored"),
                 by_answer_type=scores.get("by_answer_type"), recall=scores.get("recall"),
                 caption=scores.get("scores"))


def write_predictions(path: Path, scores: dict) -> None:
    """`test_report`'s predictions in the task's results format (see `recipe.scoring`)."""
    atomic_write_json(path, scores["predictions"])


def retention_over(teacher_value: float | None):
    """A value's share of the teacher's: None when either is not scored (a split without
    answers), 0 against a teacher that scored 0."""
    def retention(value: float | None) -> float | None:
        if value is None or teacher_value is None:
            return None
        return value / teacher_value if teacher_value else 0.0
    return retention


def run_teacher_eval(params: Params, *, prepared: Path, teacher: Path,
                     metrics: Path, predictions: Path) -> dict:
    ev = params.evaluate
    device = setup(EVAL_SEED, params.resources.threads, params.device)
    data = open_prepared(prepared, params.resources)
    model = load_model(teacher).eval()
    scores = test_report(model, data, params.task, ev, device)
    model.cpu()
    size = size_report(model, teacher, data)
    latency, timing = latency_report(timed_sets({"teacher": model}, params.task, device, {},
                                                ev.latency), data, ev.latency)
    results = TeacherResults(
        metric=ev.metric, score=score_of(scores),
        size=Size(size["params"]["total"], size["gflops_per_example"], size["size_bytes"]),
        params_by_part=size["params"], prunable_params=size["prunable_params"],
        latency_ms={bs: ms["teacher"] for bs, ms in latency.items()}, timing=timing)
    write_predictions(predictions, scores)
    atomic_write_json(metrics, results.to_json())
    # The stage's one-line summary (`pipeline.entry`); the file holds the rest.
    return {"metric": results.metric, "value": results.score.value,
            "params": results.size.params}


def speedup_split(latency: dict, gflops: dict) -> dict[str, Speedup]:
    """Per batch size: the speedup of depth (teacher / dense student) and of pruning (dense /
    pruned student), whose product is the whole; and each measured speedup over its FLOPs
    ratio, 1.0 when a model runs as fast as its arithmetic allows.
    `latency` is {batch: {model: ms}}, `gflops` {model: per example}, for teacher,
    dense_student and student."""
    out = {}
    for bs, ms in latency.items():
        depth, pruning = ms["teacher"] / ms["dense_student"], ms["dense_student"] / ms["student"]
        out[bs] = Speedup(
            total=ms["teacher"] / ms["student"], depth=depth, pruning=pruning,
            depth_over_flops_ratio=depth / (gflops["teacher"] / gflops["dense_student"]),
            pruning_over_flops_ratio=pruning / (gflops["dense_student"] / gflops["student"]),
            over_flops_ratio=depth * pruning / (gflops["teacher"] / gflops["student"]))
    return out


def run_evaluate(params: Params, *, prepared: Path, student: Path, teacher: Path,
                 teacher_metrics: Path, masks: Path, dense: Path, onnx: Path | None,
                 dense_model: Path | None, metrics: Path, predictions: Path) -> dict:
    ev, task = params.evaluate, params.task
    device = setup(EVAL_SEED, params.resources.threads, params.device)
    data = open_prepared(prepared, params.resources)
    student_model = load_model(student).eval()
    teacher_model = load_model(teacher).eval()
    # The student before pruning: what depth alone gives. Trained on the task by the dense
    # stage, it is scored too; without that stage its head is untrained: timed, not scored.
    measured_teacher = TeacherResults.read(Path(teacher_metrics))
    scores = test_report(student_model, data, task, ev, device)
    value = scores["value"]
    student_model.cpu()
    dense_value = None
    if dense_model is not None:
        dense_student = load_model(dense_model).eval()
        dense_value = test_report(dense_student, data, task, ev, device)["value"]
        dense_student.cpu()
    else:
        dense_student = task_student(dense, teacher_model, task, data).eval()
    exported = exported_models(onnx, ev.latency.threads) if onnx is not None else {}
    # The teacher in the same runtime, timed beside the files: the deployed speedup, like for like.
    exported_teacher = ({TEACHER_ONNX: onnx_teacher(teacher_model, task, data, onnx,
                                                    ev.latency.threads)} if exported else {})
    models = {"teacher": teacher_model, "dense_student": dense_student, "student": student_model}
    latency, timing = latency_report(timed_sets(models, task, device,
                                                {**exported, **exported_teacher}, ev.latency),
                                     data, ev.latency)
    generation = None
    if TASKS[task].generative:  # what a captioner costs: a whole caption, not one pass
        written = generation_report({"teacher": for_inference(teacher_model),
                                     "student": for_inference(student_model)}, data, ev)
        generation = {bs: Generation(teacher_ms=ms["teacher"], student_ms=ms["student"],
                                     speedup=ms["teacher"] / ms["student"])
                      for bs, ms in written.items()}
    # The teacher's size and FLOPs were measured by teacher_eval, from the same teacher.
    s_size = size_report(student_model, student, data)
    dense_gflops = count_flops(dense_student, *fixed_batch(data, 1)) / 1e9
    mask_info = json.loads(Path(masks).read_text())
    retention = retention_over(measured_teacher.score.value)
    gflops = {"teacher": measured_teacher.size.gflops_per_example, "dense_student": dense_gflops,
              "student": s_size["gflops_per_example"]}
    results = EvaluateResults(
        metric=ev.metric,
        teacher=Teacher(score=measured_teacher.score, size=measured_teacher.size),
        dense=Dense(value=dense_value,
                    retention=retention(dense_value),
                    size=Size(param_breakdown(dense_student)["total"], dense_gflops,
                              None if dense_model is None
                              else (Path(dense_model) / MODEL_WEIGHTS).stat().st_size)),
        student=Student(score=score_of(scores), retention=retention(value),
                        size=Size(s_size["params"]["total"], s_size["gflops_per_example"],
                                  s_size["size_bytes"]),
                        params_by_part=s_size["params"]),
        latency_ms={bs: Latency(**ms) for bs, ms in latency.items()},
        speedup=speedup_split(latency, gflops),
        generation=generation,
        sparsity=sparsity_report(mask_info),
        warnings=tuple(mask_info.get("warnings", [])),
        exported=exported_report(exported, latency, data, task, ev, value, retention,
                                 gflops["teacher"] / gflops["student"]),
        timing=timing,
    )
    write_predictions(predictions, scores)
    atomic_write_json(metrics, results.to_json())
    return {"metric": results.metric, "value": value, "retention": results.student.retention,
            "params": results.student.size.params, "sparsity": results.sparsity.overall}


def exported_report(exported: dict, latency: dict, data: PreparedData, task: str,
                    ev: EvaluateConfig, value: float, retention,
                    flops_ratio: float) -> dict[str, Exported]:
    """Each exported student file as its own row (the int8 figures never stand in for the fp32
    ones): its test metric, size, and its speedup over the teacher in ONNX Runtime (`latency`'s
    TEACHER_ONNX row), with that speedup over the FLOPs ratio (1.0 when it runs as fast as its
    arithmetic allows)."""
    out = {}
    for name, model in exported.items():
        v = classification_report(model, data, "test", task, ev.batch_size,
                                  torch.device("cpu"))["value"]
        speedups = exported_speedups(latency, name)
        out[name] = Exported(
            runtime="onnxruntime", value=v, retention=retention(v),
            retention_of_student=retention_over(value)(v), size_bytes=model.size_bytes,
            speedup=speedups["speedup"],
            over_flops_ratio={bs: s / flops_ratio for bs, s in speedups["speedup"].items()},
            speedup_over_pytorch_teacher=speedups["speedup_over_pytorch_teacher"],
            speedup_over_fastest_teacher=speedups["speedup_over_fastest_teacher"])
    return out


def exported_speedups(latency: dict, name: str) -> dict[str, dict[str, float]]:
    """An exported file's speedups per batch size where it was timed (`latency` is {batch:
    {model: ms}}): over the teacher in ONNX Runtime, over the PyTorch teacher timed in the same
    setting, and over whichever of the two ran faster."""
    timed = {bs: r for bs, r in latency.items() if r.get(name) is not None}
    return {"speedup": {bs: r[TEACHER_ONNX] / r[name] for bs, r in timed.items()},
            "speedup_over_pytorch_teacher": {bs: r["teacher"] / r[name]
                                             for bs, r in timed.items()},
            "speedup_over_fastest_teacher": {bs: min(r["teacher"], r[TEACHER_ONNX]) / r[name]
                                             for bs, r in timed.items()}}


def onnx_teacher(teacher: VLM, task: str, data: PreparedData, onnx: Path,
                 threads: int) -> OnnxModel:
    """The teacher exported as the student was (the same opset), in an ONNX Runtime session.
    The file is only timed, so it lives in a temporary folder; the session keeps the graph."""
    opset = json.loads((Path(onnx) / "export.json").read_text())["opset"]
    with tempfile.TemporaryDirectory(prefix="evlm-teacher-onnx-") as tmp:
        path = export_onnx(teacher, task, fixed_batch(data, 2), Path(tmp) / FP32_FILE, opset)
        return OnnxModel(path, threads)


def exported_models(onnx: Path, threads: int) -> dict:
    """The export stage's files in ONNX Runtime sessions: "onnx_fp32" and, if written, "onnx_int8"."""
    files = {"onnx_fp32": FP32_FILE, "onnx_int8": INT8_FILE}
    return {name: OnnxModel(Path(onnx) / f, threads) for name, f in files.items()
            if (Path(onnx) / f).is_file()}


def sparsity_report(masks: dict) -> Sparsity:
    """Sparsity reached over the prunable parameters, overall and per encoder."""
    if "encoders" not in masks:  # prune.mode none
        return Sparsity(overall=0.0, **dict.fromkeys(ENCODERS, 0.0), expected_at_end=None,
                        overruled_share=None)
    return Sparsity(overall=masks["sparsity"],
                    **{e: masks["encoders"][e]["sparsity"] if e in masks["encoders"] else None
                       for e in ENCODERS},
                    expected_at_end=masks["expected_sparsity"],
                    overruled_share=masks["overruled_share"])
