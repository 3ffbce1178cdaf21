"""Stage kind `teacher_pretrain`: pre-train the teacher on the pairs (ITC, ITM, MLM), or import one.

Reads params: seed, device, precision, resources, teacher, pretrain. Takes: pairs (prepare_pairs.data),
and the files the spec names. Writes: model (model), log (log.csv, plots). Runs
evlm_cli.recipe.teacher.run_teacher_pretrain(). Declared in evlm_cli/pipeline/registry.py; DVC runs
it as `evlm stage teacher_pretrain --params FILE ...`, and this file takes the same
arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("teacher_pretrain", sys.argv[1:]))
