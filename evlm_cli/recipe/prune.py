"""Prune stage: L0 gates under a sparsity budget, then the gated units are sliced out."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evlm_cli.compress.l0 import L0Gates, SparsityConstraint
from evlm_cli.compress.slice import slice_model
from evlm_cli.data.loader import PreparedData
from evlm_cli.errors import TrainingError
from evlm_cli.io import atomic_path, atomic_write_json
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.vlm import param_breakdown
from evlm_cli.recipe.common import Objective, evaluate_task, make_run, setup
from evlm_cli.train import Optim, adamw, empty_log, finish, fit


def run_prune(spec: dict, prepared: Path, student_dir: Path, teacher_dir: Path, out: Path,
              masks_path: Path, log_path: Path) -> dict:
    device = setup(spec)
    data = PreparedData(prepared)
    p = spec["prune"]
    student = load_model(student_dir).to(device)
    teacher = load_model(teacher_dir).to(device).eval()
    layer_maps = json.loads((Path(student_dir) / "layer_map.json").read_text())
    gates = L0Gates(student.prunable_groups(tuple(p["units"])), droprate_init=p["droprate_init"])
    gates.to(device)
    constraint = SparsityConstraint(gates, p["mode"], p["target_sparsity"], p["warmup_fraction"])
    objective = Objective(student, spec["task"], p["weights"], p["temperature"], teacher, layer_maps,
                          gates=gates, constraint=constraint)
    run = None
    if constraint.uses_gates:
        optims = [Optim(adamw(list(student.parameters()) + objective.parameters(),
                              p["train"])),
                  Optim(torch.optim.AdamW(gates.parameters(), lr=p["gate_lr"], weight_decay=0.0),
                        after_step=gates.clamp_),
                  Optim(constraint.ascent_optimizer(p["lagrangian_lr"]))]
        run = make_run("prune", spec, data, p["train"],
                       modules={"student": student, "gates": gates, "constraint": constraint,
                                **objective.modules},
                       optims=optims, loss=objective, device=device, log_path=log_path, key=(p,),
                       inputs=(student_dir, teacher_dir, prepared))
        fit(run)
    gates.eval()
    values = gates.deterministic_values() if constraint.uses_gates else {}
    student.eval()
    sliced = slice_model(student, values)
    masks = gates.summary(gates.deterministic_masks()) if constraint.uses_gates else {}
    before, after = param_breakdown(student)["total"], param_breakdown(sliced)["total"]
    if constraint.uses_gates:
        predicted = before - (gates.total_params() - gates.kept_params_from_masks(gates.deterministic_masks()))
        if predicted != after:  # a bug, not a user error, but never ship a model we cannot account for
            raise TrainingError(f"prune: sliced model has {after} parameters, masks predict {predicted}")
    masks.update({"mode": p["mode"], "target_sparsity": p["target_sparsity"],
                  "params_before": before, "params_after": after,
                  "shape": {e: {"heads": c.heads, "ffn": c.ffn, "cross_heads": c.cross_heads}
                            for e, c in (("vision", sliced.config.vision.encoder),
                                         ("text", sliced.config.text.encoder),
                                         ("fusion", sliced.config.fusion))}})
    masks["val_metric"] = evaluate_task(sliced, data, "val", spec["task"],
                                        p["train"]["batch_size"], device)
    with atomic_path(out) as tmp:
        save_model(sliced.cpu(), tmp)
        atomic_write_json(Path(tmp) / "layer_map.json", layer_maps)
    atomic_write_json(masks_path, masks)
    if run is not None:
        finish(run)
    else:
        empty_log(log_path)
    return masks
