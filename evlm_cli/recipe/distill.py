"""Distill stage: a shallower student from the pre-trained teacher's layers, trained on the
image-text pairs with the pre-training losses and KD from that teacher. It knows no task, so
every task's spec shares it."""

from __future__ import annotations

from pathlib import Path

from evlm_cli.compress.objective import Objective
from evlm_cli.core.config import Params, to_dict
from evlm_cli.core.io import atomic_path, atomic_write_json
from evlm_cli.data.loader import open_prepared
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.student import student_from_teacher
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.recipe.teacher import masking, negative_rule
from evlm_cli.training.loop import Optim, adamw, empty_log, finish, fit, make_run, setup


def run_distill(params: Params, *, pairs: Path, teacher: Path, model: Path, log: Path) -> dict:
    s, d, pt = params.student, params.distill, params.pretrain
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(pairs, params.resources)
    teacher_model = load_model(teacher).to(device).eval()
    student, layer_maps = student_from_teacher(teacher_model, s.layers(), to_dict(s.layer_map))
    student.to(device)
    summary = {"layer_map": layer_maps}
    run = None
    if d.enabled:
        objective = Objective(student, "pretrain", d.weights, d.temperature, teacher_model,
                              layer_maps, task_weights=to_dict(pt.weights),
                              masking=masking(data, pt), negative_rule=negative_rule(pt))
        run = make_run("distill", data.split("train"), d.train, params.seed,
                       modules={"student": student, **objective.modules},
                       optims=[Optim(adamw(list(student.parameters()) + objective.parameters(),
                                           d.train))],
                       loss=objective, device=device, precision=params.precision, log_path=log, key=(s, d, pt),
                       inputs=(teacher, pairs))
        summary["last_step"] = fit(run)
    summary["val_metric"] = evaluate_task(student, data, "val", "pretrain", d.train.batch_size,
                                          device)
    with atomic_path(model) as tmp:
        save_model(student.cpu(), tmp)
        atomic_write_json(Path(tmp) / "layer_map.json", layer_maps)
    if run is not None:
        finish(run)
    else:
        empty_log(log)
    return summary
