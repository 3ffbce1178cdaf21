"""Runs on disk for the report tests: typed results a test adjusts with `dataclasses.replace`,
written where `evlm diff` and `evlm show` read them."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from evlm_cli.core.results import (
    Dense,
    EvaluateResults,
    Latency,
    Score,
    Size,
    Sparsity,
    Speedup,
    Student,
    Teacher,
    Timing,
)
from evlm_cli.report.runs import Run

# Timed by evaluate on an idle 2-core machine.
TIMING = Timing(taken_by="evaluate", device="cpu", threads=2, cores=2, repeats=20, warmup=3,
                others_busy_before=0.02, others_busy_during=0.05, contended=False)

PARAMS_BY_PART = {"embeddings": 100_000, "vision": 400_000, "text": 200_000, "fusion": 250_000,
                  "heads": 50_000, "total": 1_000_000}


def results(batch_sizes=(1,), value: float = 0.9) -> EvaluateResults:
    """A VQA run's results: the student at `value`, 3x smaller and 2x faster than its teacher at
    every batch size, the dense student in between."""
    latency = {f"batch_{b}": Latency(teacher=2.0 * b, dense_student=1.5 * b, student=float(b))
               for b in batch_sizes}
    return EvaluateResults(
        metric="vqa_accuracy",
        teacher=Teacher(score=Score(0.95), size=Size(3_000_000, 0.08, 12_000_000)),
        dense=Dense(value=None, retention=None, size=Size(2_000_000, 0.04, None)),
        student=Student(score=Score(value), retention=0.947,
                        size=Size(1_000_000, 0.02, 4_000_000), params_by_part=PARAMS_BY_PART),
        latency_ms=latency,
        speedup={bs: Speedup(total=2.0, depth=4 / 3, pruning=1.5, depth_over_flops_ratio=2 / 3,
                             pruning_over_flops_ratio=0.75, over_flops_ratio=0.5)
                 for bs in latency},
        generation=None,
        sparsity=Sparsity(overall=0.5, vision=0.6, text=0.4, fusion=0.3,
                          expected_at_end=0.512, overruled_share=0.025),
        warnings=(),
        exported={},
        timing=TIMING,
    )


def fake_run(name: str, batch_sizes=(1,), lr: float = 1e-4, **changes) -> Run:
    """A finished run `name`, its fine-tuning at `lr`; `changes` replace fields of its results."""
    return Run(name, {"name": name, "finetune": {"lr": lr}},
               replace(results(batch_sizes), **changes), None)


def with_params(run: Run, **params) -> Run:
    return replace(run, params={**run.params, **params})


def write_run(root: Path, run: Run) -> None:
    """`run`'s params.yaml and evaluate/metrics.json under root/runs/."""
    folder = root / "runs" / run.name
    (folder / "evaluate").mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(run.params))
    write_metrics(root, run.name, run.results.to_json())


def write_metrics(root: Path, name: str, metrics: dict) -> Path:
    """Any JSON as run `name`'s evaluate/metrics.json (a file of another schema, say)."""
    path = root / "runs" / name / "evaluate" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics))
    return path


# The three seeds' accuracies of the `three_seeds` group.
SEED_VALUES = (0.90, 0.92, 0.97)


@pytest.fixture
def three_seeds(in_tmp_dir):
    """Runs a-s0, a-s1 and a-s2 (one spec's seeds, accuracies SEED_VALUES, speedups 2, 3 and 4
    at batch 1), and a single run b, in the working directory."""
    for seed, value in enumerate(SEED_VALUES):
        base = results((1, 32), value)
        speedup = {**base.speedup, "batch_1": replace(base.speedup["batch_1"], total=2.0 + seed)}
        run = fake_run(f"a-s{seed}", (1, 32), 1e-4,
                       student=replace(base.student, score=Score(value)), speedup=speedup)
        write_run(in_tmp_dir, with_params(
            run, seed=seed, shared_seed=0, seed_scope="compression", task="vqa",
            prune={"mode": "modal-adaptive", "target_sparsity": 0.5}))
    write_run(in_tmp_dir, fake_run("b", (1, 32), 3e-4))
    return in_tmp_dir
