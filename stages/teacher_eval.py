"""Stage kind `teacher_eval`: the teacher's metric on the test split, size, FLOPs and latency.

Reads params: task, device, resources, evaluate. Takes: prepared (prepare.data), teacher
(teacher.model). Writes: metrics (metrics.json, metrics), predictions (predictions.json).
Runs evlm_cli.recipe.evaluate.run_teacher_eval(). Declared in evlm_cli/pipeline/registry.py; DVC runs it
as `evlm stage teacher_eval --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("teacher_eval", sys.argv[1:]))
