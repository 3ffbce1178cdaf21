"""DVC stage: fine-tune the sliced student with KD from the teacher."""

from evlm_cli.recipe.finetune import run_finetune
from evlm_cli.stage import stage_main

if __name__ == "__main__":
    stage_main("finetune", ["prepared", "student", "teacher", "out", "log"],
               lambda spec, a: run_finetune(spec, a.prepared, a.student, a.teacher, a.out, a.log))
