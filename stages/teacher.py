"""Stage kind `teacher`: fine-tune the pre-trained teacher on the task (NLVR2: after text assignment, where the spec asks for it), or import a task teacher.

Reads params: seed, task, device, precision, resources, augment, task_teacher. Takes: prepared (prepare.data),
pretrained (teacher_pretrain.model), and the files the spec names. Takes, when the spec has
that stage: assigned (text_assignment.model). Writes: model (model),
log (log.csv, plots). Runs evlm_cli.recipe.teacher.run_teacher(). Declared in
evlm_cli/pipeline/registry.py; DVC runs it as `evlm stage teacher --params FILE ...`, and this file
takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("teacher", sys.argv[1:]))
