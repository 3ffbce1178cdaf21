"""DVC stage: the teacher's metric, size, FLOPs and latency."""

from evlm_cli.io import atomic_write_json
from evlm_cli.recipe.evaluate import run_teacher_eval
from evlm_cli.stage import stage_main


def body(spec, a):
    metrics = run_teacher_eval(spec, a.prepared, a.teacher)
    atomic_write_json(a.metrics, metrics)
    return metrics


if __name__ == "__main__":
    stage_main("teacher_eval", ["prepared", "teacher", "metrics"], body)
