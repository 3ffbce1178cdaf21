"""Stage kind `prune`: the distilled student with a fresh task head: L0 gates under the sparsity budget, KD from the task teacher, then the gated units sliced out.

Reads params: seed, task, device, precision, resources, augment, prune. Takes: prepared (prepare.data), student
(distill.model), teacher (teacher.model). Writes: model (model), masks (masks.json,
metrics), log (log.csv, plots). Runs evlm_cli.recipe.prune.run_prune(). Declared in
evlm_cli/pipeline/registry.py; DVC runs it as `evlm stage prune --params FILE ...`, and this file
takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("prune", sys.argv[1:]))
