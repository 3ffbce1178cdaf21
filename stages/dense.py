"""Stage kind `dense`: the distilled student, not pruned, trained on the task with KD from the task teacher (by default pruning's terms: hidden states and attention too): the depth-only baseline evaluate scores.

Reads params: seed, task, device, precision, resources, augment, finetune, dense. Takes: prepared (prepare.data),
student (distill.model), teacher (teacher.model). Writes: model (model), log (log.csv, plots).
Runs evlm_cli.recipe.finetune.run_dense(). Declared in evlm_cli/pipeline/registry.py; DVC runs it
as `evlm stage dense --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("dense", sys.argv[1:]))
