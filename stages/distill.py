"""DVC stage: initialise the student from teacher layers and distil the teacher into it."""

from evlm_cli.recipe.distill import run_distill
from evlm_cli.stage import stage_main

if __name__ == "__main__":
    stage_main("distill", ["prepared", "teacher", "out", "log"],
               lambda spec, a: run_distill(spec, a.prepared, a.teacher, a.out, a.log))
