"""DVC stage: import the teacher, or train it on the task."""

from evlm_cli.recipe.teacher import run_teacher
from evlm_cli.stage import stage_main

if __name__ == "__main__":
    stage_main("teacher", ["prepared", "out", "log"],
               lambda spec, a: run_teacher(spec, a.prepared, a.out, a.log))
