"""Finetune stage: the sliced student recovers accuracy with task loss + KD from the teacher."""

from __future__ import annotations

import json
from pathlib import Path

from evlm_cli.data.loader import PreparedData
from evlm_cli.io import atomic_path
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.recipe.common import Objective, evaluate_task, make_run, setup
from evlm_cli.train import Optim, adamw, finish, fit


def run_finetune(spec: dict, prepared: Path, pruned_dir: Path, teacher_dir: Path, out: Path,
                 log_path: Path) -> dict:
    device = setup(spec)
    data = PreparedData(prepared)
    f = spec["finetune"]
    student = load_model(pruned_dir).to(device)
    teacher = load_model(teacher_dir).to(device).eval()
    layer_maps = json.loads((Path(pruned_dir) / "layer_map.json").read_text())
    objective = Objective(student, spec["task"], f["weights"], f["temperature"], teacher, layer_maps)
    run = make_run("finetune", spec, data, f["train"],
                   modules={"student": student, **objective.modules},
                   optims=[Optim(adamw(list(student.parameters()) + objective.parameters(),
                                       f["train"]))],
                   loss=objective, device=device, log_path=log_path, key=(f,),
                   inputs=(pruned_dir, teacher_dir, prepared))
    last = fit(run)
    summary = {"last_step": last, "val_metric": evaluate_task(student, data, "val", spec["task"],
                                                              f["train"]["batch_size"], device)}
    with atomic_path(out) as tmp:
        save_model(student.cpu(), tmp)
    finish(run)
    return summary
