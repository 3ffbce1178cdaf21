"""Finetune stage: the sliced student recovers accuracy with task loss + KD from the teacher."""

from __future__ import annotations

import json
from pathlib import Path

from evlm_cli.compress.objective import Objective
from evlm_cli.config import Params
from evlm_cli.data.loader import PreparedData
from evlm_cli.io import atomic_path
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.train import Optim, adamw, finish, fit, make_run, setup


def run_finetune(params: Params, *, prepared: Path, student: Path, teacher: Path, model: Path,
                 log: Path) -> dict:
    f = params.finetune
    device = setup(params.seed, params.resources.threads, params.device)
    data = PreparedData(prepared)
    student_model = load_model(student).to(device)
    teacher_model = load_model(teacher).to(device).eval()
    layer_maps = json.loads((Path(student) / "layer_map.json").read_text())
    objective = Objective(student_model, params.task, f.weights, f.temperature, teacher_model,
                          layer_maps)
    run = make_run("finetune", data.split("train"), f.train, params.seed,
                   modules={"student": student_model, **objective.modules},
                   optims=[Optim(adamw(list(student_model.parameters()) + objective.parameters(),
                                       f.train))],
                   loss=objective, device=device, log_path=log, key=(f,),
                   inputs=(student, teacher, prepared))
    last = fit(run)
    summary = {"last_step": last,
               "val_metric": evaluate_task(student_model, data, "val", params.task,
                                           f.train.batch_size, device)}
    with atomic_path(model) as tmp:
        save_model(student_model.cpu(), tmp)
    finish(run)
    return summary
