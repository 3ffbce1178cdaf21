"""Stage kind `teacher`: import the teacher, or train it on the task.

Reads params: seed, task, device, resources, teacher. Takes: prepared (prepare.data).
Writes: model (model), log (log.csv, plots). Runs evlm_cli.recipe.teacher.run_teacher().
Declared in evlm_cli/pipeline.py; DVC runs it as `evlm stage teacher --params FILE ...`, and
this file takes the same arguments.
"""

import sys

from evlm_cli.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("teacher", sys.argv[1:]))
