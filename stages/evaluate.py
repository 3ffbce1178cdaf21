"""Stage kind `evaluate`: the student's metric, retention, size, FLOPs, speedup and sparsity; the dense distilled student scored and timed alongside, to split both into depth and pruning.

Reads params: task, device, resources, evaluate. Takes: prepared (prepare.data), student
(finetune.model), teacher (teacher.model), teacher_metrics (teacher_eval.metrics), masks
(prune.masks), dense (distill.model). Takes, when the spec has that stage: onnx
(export.onnx), dense_model (dense.model). Writes: metrics (metrics.json, metrics),
predictions (predictions.json). Runs evlm_cli.recipe.evaluate.run_evaluate(). Declared in evlm_cli/pipeline/registry.py; DVC runs it as
`evlm stage evaluate --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("evaluate", sys.argv[1:]))
