"""Stage kind `finetune`: the sliced student recovers with the task loss and KD from the teacher.

Reads params: seed, task, device, precision, resources, augment, finetune. Takes: prepared (prepare.data),
student (prune.model), teacher (teacher.model). Writes: model (model), log (log.csv, plots).
Runs evlm_cli.recipe.finetune.run_finetune(). Declared in evlm_cli/pipeline/registry.py; DVC runs it
as `evlm stage finetune --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("finetune", sys.argv[1:]))
