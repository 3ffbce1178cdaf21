"""DVC stage: the student's metric, retention, size, FLOPs, speedup and sparsity per encoder."""

from evlm_cli.io import atomic_write_json
from evlm_cli.recipe.evaluate import run_evaluate
from evlm_cli.stage import stage_main


def body(spec, a):
    metrics = run_evaluate(spec, a.prepared, a.student, a.teacher, a.teacher_metrics, a.masks)
    atomic_write_json(a.metrics, metrics)
    return metrics


if __name__ == "__main__":
    stage_main("evaluate", ["prepared", "student", "teacher", "teacher_metrics", "masks", "metrics"], body)
