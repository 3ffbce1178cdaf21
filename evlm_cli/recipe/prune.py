"""Prune stage: L0 gates under a sparsity budget, then the gated units are sliced out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evlm_cli.compress.l0 import L0Gates, SparsityConstraint
from evlm_cli.compress.objective import Objective
from evlm_cli.compress.slice import slice_model
from evlm_cli.config import Params
from evlm_cli.data.loader import PreparedData
from evlm_cli.errors import TrainingError
from evlm_cli.io import atomic_path, atomic_write_json
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.vlm import param_breakdown, with_heads
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.tasks import TASKS
from evlm_cli.train import Optim, adamw, empty_log, finish, fit, make_run, setup


def run_prune(params: Params, *, prepared: Path, student: Path, teacher: Path, model: Path,
              masks: Path, log: Path) -> dict:
    p = params.prune
    device = setup(params.seed, params.resources.threads, params.device)
    data = PreparedData(prepared)
    teacher_model = load_model(teacher).to(device).eval()
    # The distilled student knows no task: it gets the task's heads, shaped as the teacher's.
    # A classifier starts fresh; retrieval keeps the pre-trained ITC and ITM heads, captioning
    # the MLM head as its LM head.
    student_model = with_heads(load_model(student), list(TASKS[params.task].heads),
                               num_answers=teacher_model.config.num_answers,
                               pool=teacher_model.config.pool).to(device)
    layer_maps = json.loads((Path(student) / "layer_map.json").read_text())
    gates = L0Gates(student_model.prunable_groups(p.units), droprate_init=p.droprate_init)
    gates.to(device)
    constraint = SparsityConstraint(gates, p.mode, p.target_sparsity, p.warmup_fraction)
    objective = Objective(student_model, params.task, p.weights, p.temperature, teacher_model,
                          layer_maps, gates=gates, constraint=constraint)
    run = None
    if constraint.uses_gates:
        optims = [Optim(adamw(list(student_model.parameters()) + objective.parameters(), p.train)),
                  Optim(torch.optim.AdamW(gates.parameters(), lr=p.gate_lr, weight_decay=0.0),
                        after_step=gates.clamp_),
                  Optim(constraint.ascent_optimizer(p.lagrangian_lr))]
        run = make_run("prune", data.split("train"), p.train, params.seed,
                       modules={"student": student_model, "gates": gates,
                                "constraint": constraint, **objective.modules},
                       optims=optims, loss=objective, device=device, log_path=log, key=(p,),
                       inputs=(student, teacher, prepared))
        fit(run)
    gates.eval()
    values = gates.deterministic_values() if constraint.uses_gates else {}
    student_model.eval()
    sliced = slice_model(student_model, values)
    report = gates.summary(gates.deterministic_masks()) if constraint.uses_gates else {}
    before, after = param_breakdown(student_model)["total"], param_breakdown(sliced)["total"]
    if constraint.uses_gates:
        kept = gates.kept_params_from_masks(gates.deterministic_masks())
        predicted = before - (gates.total_params() - kept)
        if predicted != after:  # a bug, not a user error, but never ship a model we cannot account for
            raise TrainingError(f"prune: sliced model has {after} parameters, masks predict {predicted}")
    report.update({"mode": p.mode, "target_sparsity": p.target_sparsity,
                   "params_before": before, "params_after": after,
                   "shape": {e: {"heads": c.heads, "ffn": c.ffn, "cross_heads": c.cross_heads}
                             for e, c in (("vision", sliced.config.vision.encoder),
                                          ("text", sliced.config.text.encoder),
                                          ("fusion", sliced.config.fusion))}})
    report["val_metric"] = evaluate_task(sliced, data, "val", params.task, p.train.batch_size,
                                         device)
    with atomic_path(model) as tmp:
        save_model(sliced.cpu(), tmp)
        atomic_write_json(Path(tmp) / "layer_map.json", layer_maps)
    atomic_write_json(masks, report)
    if run is not None:
        finish(run)
    else:
        empty_log(log)
    return report
