"""Finetune stages: a student trained on the task with its loss and KD from the task teacher.

`finetune` recovers the sliced student's accuracy; `dense` trains the distilled student, not
pruned, the same way but with its own loss weights: the depth-only baseline that evaluate
scores next to the pruned one. Those default to pruning's (hidden states and attention
distilled too), since the pruned student learns from them while it is pruned.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from evlm_cli.compress.objective import Objective
from evlm_cli.core.config import LossWeights, OptimConfig, Params
from evlm_cli.core.io import atomic_path
from evlm_cli.data.loader import PreparedData, open_prepared
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.vlm import VLM
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.recipe.student import task_layer_maps, task_student
from evlm_cli.tasks import task_for
from evlm_cli.training.loop import Optim, adamw, finish, fit, make_run, setup


def run_finetune(params: Params, *, prepared: Path, student: Path, teacher: Path, model: Path,
                 log: Path) -> dict:
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(prepared, params.resources, params.augment)
    return _train_on_task("finetune", params, params.finetune.train, params.finetune.weights,
                          load_model(student), load_model(teacher), data, device=device,
                          prepared=prepared, student=student, teacher=teacher, model=model,
                          log=log)


def run_dense(params: Params, *, prepared: Path, student: Path, teacher: Path, model: Path,
              log: Path) -> dict:
    device = setup(params.seed, params.resources.threads, params.device)
    teacher_model = load_model(teacher)
    data = open_prepared(prepared, params.resources, params.augment)
    dense = task_student(student, teacher_model, params.task, data)
    train = dataclasses.replace(params.finetune.train, epochs=params.dense.epochs)
    return _train_on_task("dense", params, train, params.dense.weights, dense, teacher_model,
                          data, device=device, prepared=prepared, student=student,
                          teacher=teacher, model=model, log=log)


def _train_on_task(name: str, params: Params, train: OptimConfig, weights: LossWeights,
                   student_model: VLM, teacher_model: VLM, data: PreparedData, *, device,
                   prepared: Path, student: Path, teacher: Path, model: Path, log: Path) -> dict:
    """Train `student_model` with `weights` and finetune's temperature and label smoothing
    under `train`, then write it to `model`. The paths key the resume folder."""
    f = params.finetune
    student_model = student_model.to(device)
    teacher_model = teacher_model.to(device).eval()
    layer_maps = json.loads((Path(student) / "layer_map.json").read_text())
    objective = Objective(student_model, params.task, weights, f.temperature, teacher_model,
                          task_layer_maps(layer_maps, params.task),
                          task_spec=task_for(params.task, data.meta, f.label_smoothing))
    run = make_run(name, data.split("train"), train, params.seed,
                   modules={"student": student_model, **objective.modules},
                   optims=[Optim(adamw(list(student_model.parameters()) + objective.parameters(),
                                       train))],
                   loss=objective, device=device, precision=params.precision, log_path=log,
                   key=(weights, f.temperature, f.label_smoothing, train, params.augment),
                   inputs=(student, teacher, prepared), augment=data.augmenter(params.augment))
    last = fit(run)
    summary = {"last_step": last,
               "val_metric": evaluate_task(student_model, data, "val", params.task,
                                           train.batch_size, device)}
    with atomic_path(model) as tmp:
        save_model(student_model.cpu(), tmp)
    finish(run)
    return summary
