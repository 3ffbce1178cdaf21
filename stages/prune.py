"""DVC stage: L0 pruning under the sparsity budget, then physical slicing; writes masks.json."""

from evlm_cli.recipe.prune import run_prune
from evlm_cli.stage import stage_main

if __name__ == "__main__":
    stage_main("prune", ["prepared", "student", "teacher", "out", "masks", "log"],
               lambda spec, a: run_prune(spec, a.prepared, a.student, a.teacher, a.out, a.masks, a.log))
