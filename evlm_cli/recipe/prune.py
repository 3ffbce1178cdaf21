"""Prune stage: L0 gates under a sparsity budget, then the gated units are sliced out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from evlm_cli.compress.l0 import L0Gates, SparsityConstraint
from evlm_cli.compress.objective import Objective
from evlm_cli.compress.slice import slice_model
from evlm_cli.core.config import Params
from evlm_cli.core.errors import TrainingError
from evlm_cli.core.io import atomic_path, atomic_write_json
from evlm_cli.core.ranks import is_main
from evlm_cli.data.loader import open_prepared
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.vlm import param_breakdown
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.recipe.student import task_layer_maps, task_student
from evlm_cli.tasks import task_for
from evlm_cli.training.loop import Optim, adamw, empty_log, finish, fit, make_run, setup

# Training that ends further than this from the target gets a warning: the final selection
# still meets the target, but it then overrules the gates on many units.
GAP_WARNING = 0.02
# An encoder keeping less than this above its floor is reported as at its floor.
NEAR_FLOOR = 0.01


def budget_warnings(report: dict, mode: str, target: float, min_keep: float) -> list[str]:
    """What a user should know about how the target was met (see `GAP_WARNING`, `NEAR_FLOOR`)."""
    warnings = []
    if report["training_gap"] > GAP_WARNING:
        scope = "overall" if mode == "modal-adaptive" else "in the furthest encoder"
        warnings.append(f"training ended {report['training_gap']:.3f} from the target "
                        f"{target:g} {scope}; the final selection met it, overruling the gates "
                        "(train longer, or raise quadratic_penalty)")
    cross = [layer["cross_heads"]["kept"] for layer in
             report["encoders"].get("fusion", {}).get("layers", []) if "cross_heads" in layer]
    if cross and not any(cross):
        warnings.append("the fusion encoder keeps no cross-attention head: its output no longer "
                        "reads the image (the exported model takes no images input)")
    if mode == "modal-adaptive" and min_keep > 0:
        for enc, info in report["encoders"].items():
            kept = 1.0 - info["sparsity"]
            if kept < min_keep + NEAR_FLOOR:
                warnings.append(f"the {enc} encoder keeps {kept:.3f} of its prunable "
                                f"parameters, at its floor min_keep {min_keep:g}")
    return warnings


def run_prune(params: Params, *, prepared: Path, student: Path, teacher: Path, model: Path,
              masks: Path, log: Path) -> dict:
    p = params.prune
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(prepared, params.resources, params.augment)
    teacher_model = load_model(teacher).to(device).eval()
    student_model = task_student(student, teacher_model, params.task, data).to(device)
    layer_maps = json.loads((Path(student) / "layer_map.json").read_text())
    gates = L0Gates(student_model.prunable_groups(p.units), droprate_init=p.droprate_init,
                    init=p.gate_init)
    gates.to(device)
    constraint = SparsityConstraint(gates, p.mode, p.target_sparsity, p.warmup_fraction,
                                    min_keep=p.min_keep, quadratic_penalty=p.quadratic_penalty)
    objective = Objective(student_model, params.task, p.weights, p.temperature, teacher_model,
                          task_layer_maps(layer_maps, params.task), gates=gates, constraint=constraint,
                          task_spec=task_for(params.task, data.meta, p.label_smoothing))
    run = None
    if constraint.uses_gates:
        optims = [Optim(adamw(list(student_model.parameters()) + objective.parameters(), p.train)),
                  Optim(torch.optim.AdamW(gates.parameters(), lr=p.gate_lr, weight_decay=0.0),
                        after_step=gates.clamp_),
                  Optim(constraint.ascent_optimizer(p.lagrangian_lr))]
        run = make_run("prune", data.split("train"), p.train, params.seed,
                       modules={"student": student_model, "gates": gates,
                                "constraint": constraint, **objective.modules},
                       optims=optims, loss=objective, device=device, precision=params.precision, log_path=log,
                       key=(p, params.augment), inputs=(student, teacher, prepared),
                       augment=data.augmenter(params.augment), ascending=("constraint",))
        fit(run)
    gates.eval()
    kept_units, values, report = {}, {}, {}
    if constraint.uses_gates:
        kept_units = constraint.final_masks()
        values = gates.deterministic_values(kept_units)
        overruled, units = gates.overruled(kept_units)
        report = {**gates.summary(kept_units), "training_gap": constraint.training_gap(),
                  "overruled_units": overruled, "units": units,
                  "overruled_share": overruled / units if units else 0.0}
        report["warnings"] = budget_warnings(report, p.mode, p.target_sparsity, p.min_keep)
        for line in report["warnings"] if is_main() else []:  # once, not once per process
            print(f"warning: prune: {line}", file=sys.stderr)
    student_model.eval()
    sliced = slice_model(student_model, values)
    before, after = param_breakdown(student_model)["total"], param_breakdown(sliced)["total"]
    if constraint.uses_gates:
        kept = gates.kept_params_from_masks(kept_units)
        predicted = before - (gates.total_params() - kept)
        if predicted != after:  # a bug, not a user error, but never ship a model we cannot account for
            raise TrainingError(f"prune: sliced model has {after} parameters, masks predict {predicted}")
    report.update({"mode": p.mode, "target_sparsity": p.target_sparsity, "min_keep": p.min_keep,
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
