"""Stage kind `distill`: a shallower student from the teacher's layers, trained to match it.

Reads params: seed, task, device, resources, student, distill. Takes: prepared
(prepare.data), teacher (teacher.model). Writes: model (model), log (log.csv, plots). Runs
evlm_cli.recipe.distill.run_distill(). Declared in evlm_cli/pipeline.py; DVC runs it as
`evlm stage distill --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.stage import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("distill", sys.argv[1:]))
