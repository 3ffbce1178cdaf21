"""Teacher stage: import a fine-tuned checkpoint, or train the teacher on the task."""

from __future__ import annotations

from pathlib import Path

from evlm_cli.compress.objective import TASK_ONLY, Objective
from evlm_cli.config import OptimConfig, Params
from evlm_cli.data.loader import PreparedData
from evlm_cli.io import atomic_path
from evlm_cli.models.build import build_teacher
from evlm_cli.models.checkpoint import save_model
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.train import Optim, adamw, empty_log, finish, fit, make_run, setup


def param_groups(model, pretrained: set[str], optim_cfg: OptimConfig, lr_scale: float):
    """Pretrained tensors train at lr x lr_scale; the new ones at the full lr."""
    named = dict(model.named_parameters())
    old = [p for n, p in named.items() if n in pretrained]
    new = [p for n, p in named.items() if n not in pretrained]
    opt = adamw(new, optim_cfg)
    if old:
        extra = adamw(old, optim_cfg, lr=optim_cfg.lr * lr_scale)
        for group in extra.param_groups:
            opt.add_param_group(group)
    return opt


def run_teacher(params: Params, *, prepared: Path, model: Path, log: Path) -> dict:
    t = params.teacher
    device = setup(params.seed, params.resources.threads, params.device)
    data = PreparedData(prepared)
    teacher, pretrained = build_teacher(
        t, task=params.task, seed=params.seed, image_size=data.meta["image_size"],
        vocab_size=data.meta["vocab_size"], max_text_len=data.meta["max_text_len"],
        num_answers=data.num_answers)
    # An evlm checkpoint is a finished task model; an X-VLM one still needs its task head trained.
    train = not t.imports_finished_model
    summary = {"imported": bool(t.checkpoint), "pretrained_tensors": len(pretrained)}
    if train:
        teacher.to(device)
        run = make_run("teacher", data.split("train"), t.train, params.seed,
                       modules={"model": teacher},
                       optims=[Optim(param_groups(teacher, pretrained, t.train, t.init.lr_scale))],
                       loss=Objective(teacher, params.task, TASK_ONLY, 1.0), device=device,
                       log_path=log, key=(t,), inputs=(prepared,))
        summary["last_step"] = fit(run)
    summary["val_metric"] = evaluate_task(teacher, data, "val", params.task, t.train.batch_size,
                                          device)
    with atomic_path(model) as tmp:
        save_model(teacher.cpu(), tmp)
    if train:
        finish(run)
    else:
        empty_log(log)
    return summary
