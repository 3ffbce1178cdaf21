"""Stage kind `distill`: a shallower student from the pre-trained teacher's layers, trained on the pairs to match it (task-agnostic).

Reads params: seed, device, precision, resources, pretrain, student, distill. Takes: pairs
(prepare_pairs.data), teacher (teacher_pretrain.model). Writes: model (model), log (log.csv,
plots). Runs evlm_cli.recipe.distill.run_distill(). Declared in evlm_cli/pipeline/registry.py; DVC
runs it as `evlm stage distill --params FILE ...`, and this file takes the same arguments.
"""

import sys

from evlm_cli.pipeline.entry import run_stage

if __name__ == "__main__":
    sys.exit(run_stage("distill", sys.argv[1:]))
