"""Distill stage: a shallower student from the teacher's layers, trained to match the teacher."""

from __future__ import annotations

from pathlib import Path

from evlm_cli.data.loader import PreparedData
from evlm_cli.io import atomic_path, atomic_write_json
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.student import student_from_teacher
from evlm_cli.recipe.common import Objective, evaluate_task, make_run, setup
from evlm_cli.train import Optim, adamw, empty_log, finish, fit


def run_distill(spec: dict, prepared: Path, teacher_dir: Path, out: Path, log_path: Path) -> dict:
    device = setup(spec)
    data = PreparedData(prepared)
    teacher = load_model(teacher_dir).to(device).eval()
    s = spec["student"]
    student, layer_maps = student_from_teacher(
        teacher, {"vision": s["vision_layers"], "text": s["text_layers"], "fusion": s["fusion_layers"]},
        s["layer_map"])
    student.to(device)
    d = spec["distill"]
    summary = {"layer_map": layer_maps}
    run = None
    if d["enabled"]:
        objective = Objective(student, spec["task"], d["weights"], d["temperature"], teacher, layer_maps)
        params = list(student.parameters()) + objective.parameters()
        run = make_run("distill", spec, data, d["train"],
                       modules={"student": student, **objective.modules},
                       optims=[Optim(adamw(params, d["train"]))], loss=objective, device=device,
                       log_path=log_path, key=(s, d), inputs=(teacher_dir, prepared))
        summary["last_step"] = fit(run)
    summary["val_metric"] = evaluate_task(student, data, "val", spec["task"],
                                          d["train"]["batch_size"], device)
    with atomic_path(out) as tmp:
        save_model(student.cpu(), tmp)
        atomic_write_json(Path(tmp) / "layer_map.json", layer_maps)
    if run is not None:
        finish(run)
    else:
        empty_log(log_path)
    return summary
