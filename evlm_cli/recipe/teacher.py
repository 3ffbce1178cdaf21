"""Teacher stage: import a fine-tuned checkpoint, or train the teacher on the task."""

from __future__ import annotations

from pathlib import Path

from evlm_cli.data.loader import PreparedData
from evlm_cli.io import atomic_path
from evlm_cli.models.checkpoint import save_model
from evlm_cli.recipe.common import Objective, build_teacher, evaluate_task, make_run, setup
from evlm_cli.train import Optim, adamw, empty_log, finish, fit

NO_KD = {"task": 1.0, "logits": 0.0, "hidden": 0.0, "attention": 0.0}


def param_groups(model, pretrained: set[str], optim_cfg: dict, lr_scale: float):
    """Pretrained tensors train at lr x lr_scale; the new ones at the full lr."""
    named = dict(model.named_parameters())
    old = [p for n, p in named.items() if n in pretrained]
    new = [p for n, p in named.items() if n not in pretrained]
    opt = adamw(new, optim_cfg)
    if old:
        extra = adamw(old, optim_cfg, lr=optim_cfg["lr"] * lr_scale)
        for group in extra.param_groups:
            opt.add_param_group(group)
    return opt


def run_teacher(spec: dict, prepared: Path, out: Path, log_path: Path) -> dict:
    device = setup(spec)
    data = PreparedData(prepared)
    model, pretrained = build_teacher(spec, data)
    t = spec["teacher"]
    # An evlm checkpoint is a finished task model; an X-VLM one still needs its task head trained.
    train = not (t["checkpoint"] and t["checkpoint_format"] == "evlm")
    summary = {"imported": bool(t["checkpoint"]), "pretrained_tensors": len(pretrained)}
    if train:
        optim_cfg = t["train"]
        model.to(device)
        objective = Objective(model, spec["task"], NO_KD, 1.0)
        run = make_run("teacher", spec, data, optim_cfg, modules={"model": model},
                       optims=[Optim(param_groups(model, pretrained, optim_cfg,
                                                  t["init"]["lr_scale"]))],
                       loss=objective, device=device, log_path=log_path, key=(t,),
                       inputs=(prepared,))
        summary["last_step"] = fit(run)
    summary["val_metric"] = evaluate_task(model, data, "val", spec["task"],
                                          t["train"]["batch_size"], device)
    with atomic_path(out) as tmp:
        save_model(model.cpu(), tmp)
    if train:
        finish(run)
    else:
        empty_log(log_path)
    return summary
