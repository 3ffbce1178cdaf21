"""Evaluation stages: the task metric, size, FLOPs, and latency measured next to the teacher."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evlm_cli.compress.measure import count_flops, measure_latency
from evlm_cli.config import ENCODERS, LatencyConfig, Params
from evlm_cli.data.loader import PreparedData
from evlm_cli.io import atomic_write_json
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.vlm import VLM, model_inputs, param_breakdown, prunable_param_count
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.train import setup, trim_text

# Evaluation draws nothing at random; its params carry no seed.
EVAL_SEED = 0


def fixed_batch(data: PreparedData, batch_size: int) -> tuple:
    """The first `batch_size` test examples, the same for every model measured."""
    split = data.split("test")
    n = min(batch_size, len(split))
    batch = trim_text(split.gather(torch.arange(n)))
    if n < batch_size:  # tiny smoke data: repeat to the requested size
        reps = -(-batch_size // n)
        batch = {k: v.repeat(reps, *[1] * (v.ndim - 1))[:batch_size] for k, v in batch.items()}
    return model_inputs(batch)


def size_report(model: VLM, data: PreparedData) -> dict:
    inputs = fixed_batch(data, 1)
    return {"params": param_breakdown(model), "prunable_params": prunable_param_count(model.config),
            "gflops_per_example": count_flops(model, *inputs) / 1e9}


def latency_report(models: dict[str, VLM], data: PreparedData, latency_cfg: LatencyConfig) -> dict:
    """Median latency (ms) per model and batch size, all models interleaved in one process."""
    out = {}
    for bs in latency_cfg.batch_sizes:
        inputs = fixed_batch(data, bs)
        calls = {name: (lambda m=m, x=inputs: m(*x)) for name, m in models.items()}
        res = measure_latency(calls, repeats=latency_cfg.repeats, warmup=latency_cfg.warmup,
                              threads=latency_cfg.threads)
        out[f"batch_{bs}"] = {name: r["median_ms"] for name, r in res.items()}
    return out


def run_teacher_eval(params: Params, *, prepared: Path, teacher: Path, metrics: Path) -> dict:
    ev = params.evaluate
    device = setup(EVAL_SEED, params.resources.threads, params.device)
    data = PreparedData(prepared)
    model = load_model(teacher).eval()
    value = evaluate_task(model, data, "test", params.task, ev.batch_size, device)
    model.cpu()
    report = {"metric": ev.metric, "value": value, **size_report(model, data),
              "latency_ms": latency_report({"teacher": model}, data, ev.latency)}
    atomic_write_json(metrics, report)
    return report


def run_evaluate(params: Params, *, prepared: Path, student: Path, teacher: Path,
                 teacher_metrics: Path, masks: Path, metrics: Path) -> dict:
    ev = params.evaluate
    device = setup(EVAL_SEED, params.resources.threads, params.device)
    data = PreparedData(prepared)
    student_model = load_model(student).eval()
    teacher_model = load_model(teacher).eval()
    t_metrics = json.loads(Path(teacher_metrics).read_text())
    value = evaluate_task(student_model, data, "test", params.task, ev.batch_size, device)
    student_model.cpu()
    latency = latency_report({"teacher": teacher_model, "student": student_model}, data,
                             ev.latency)
    speedup = {bs: r["teacher"] / r["student"] for bs, r in latency.items()}
    s_size, t_size = size_report(student_model, data), size_report(teacher_model, data)
    mask_info = json.loads(Path(masks).read_text())
    report = {
        "metric": ev.metric,
        "value": value,
        "teacher_value": t_metrics["value"],
        "retention": value / t_metrics["value"] if t_metrics["value"] else 0.0,
        "params": s_size["params"]["total"],
        "teacher_params": t_size["params"]["total"],
        "params_by_part": s_size["params"],
        "gflops_per_example": s_size["gflops_per_example"],
        "teacher_gflops_per_example": t_size["gflops_per_example"],
        "latency_ms": latency,
        "speedup": speedup,
        "sparsity": sparsity_report(mask_info),
    }
    atomic_write_json(metrics, report)
    return report


def sparsity_report(masks: dict) -> dict:
    """Sparsity reached over the prunable parameters, overall and per encoder."""
    if "encoders" not in masks:  # prune.mode none
        return {"overall": 0.0, **dict.fromkeys(ENCODERS, 0.0)}
    return {"overall": masks["sparsity"],
            **{e: masks["encoders"][e]["sparsity"] for e in ENCODERS if e in masks["encoders"]}}
