"""Teacher stages: pre-train the teacher on image-text pairs, then fine-tune it per task."""

from __future__ import annotations

from pathlib import Path

import torch

from evlm_cli.compress.objective import (
    TASK_ONLY,
    TEXT_ASSIGNMENT,
    Masking,
    NegativeRule,
    Objective,
    assign_step,
)
from evlm_cli.core.config import OptimConfig, Params, PretrainConfig, to_dict
from evlm_cli.core.errors import CheckpointError
from evlm_cli.core.io import atomic_path
from evlm_cli.data.loader import PreparedData, open_prepared
from evlm_cli.models.build import build_teacher, import_xvlm_task_teacher, require_vocabulary
from evlm_cli.models.checkpoint import load_model, save_model
from evlm_cli.models.vlm import VLM, with_heads
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.tasks import PRETRAIN_HEADS, TASKS, task_for
from evlm_cli.tasks.pretrain import continuation_ids
from evlm_cli.training.loop import Optim, adamw, empty_log, finish, fit, make_run, setup


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


def masking(data: PreparedData, pt: PretrainConfig) -> Masking:
    """MLM's masking as `pretrain` asks, with the prepared tokenizer's ids."""
    meta = data.meta
    whole_words = pt.masking == "whole_words"
    return Masking(mask_id=meta["mask_token_id"], vocab_size=meta["vocab_size"],
                   special_ids=tuple(meta["special_token_ids"]), prob=pt.mask_prob,
                   whole_words=whole_words, max_masks=pt.max_masks, span_prob=pt.mask_span_prob,
                   continuation_ids=(continuation_ids(data.tokenizer().get_vocab())
                                     if whole_words else ()))


def negative_rule(pt: PretrainConfig) -> NegativeRule:
    """Where pre-training's ITC and ITM find their negatives, as `pretrain` asks."""
    return NegativeRule(across_processes=pt.itc_negatives == "global",
                        hard_share=pt.hard_negatives, floor=pt.hard_negative_floor)


def run_teacher_pretrain(params: Params, *, pairs: Path, model: Path, log: Path) -> dict:
    """Build the teacher (from scratch, pretrained parts or a pre-trained checkpoint) and
    pre-train it on the pairs with ITC, ITM and MLM for `pretrain.train` (0 epochs: as imported)."""
    t, pt = params.teacher, params.pretrain
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(pairs, params.resources)
    teacher, pretrained = build_teacher(
        t, heads=list(PRETRAIN_HEADS), seed=params.seed, image_size=data.meta["image_size"],
        vocab_size=data.meta["vocab_size"], max_text_len=data.meta["max_text_len"])
    teacher.to(device)
    objective = Objective(teacher, "pretrain", TASK_ONLY, 1.0, task_weights=to_dict(pt.weights),
                          masking=masking(data, pt), negative_rule=negative_rule(pt))
    run = make_run("teacher_pretrain", data.split("train"), pt.train, params.seed,
                   modules={"model": teacher},
                   optims=[Optim(param_groups(teacher, pretrained, pt.train, t.init.lr_scale))],
                   loss=objective, device=device, precision=params.precision, log_path=log, key=(t, pt), inputs=(pairs,))
    summary = {"imported": bool(t.checkpoint), "pretrained_tensors": len(pretrained),
               "last_step": fit(run),
               "val_metric": evaluate_task(teacher, data, "val", "pretrain",
                                           pt.train.batch_size, device)}
    with atomic_path(model) as tmp:
        save_model(teacher.cpu(), tmp)
    finish(run)
    return summary


def run_text_assignment(params: Params, *, pairs: Path, pretrained: Path, model: Path,
                        log: Path) -> dict:
    """NLVR2's domain pre-training (X-VLM's `NLVR_pretrain.py`): the pre-trained teacher with
    its fusion layers paired and a fresh `ta` head learns, on the pairs, which of two images
    a caption describes (`objective.assign_step`). Its ITC projection draws the negatives and
    stays as it is. The NLVR2 teacher is then fine-tuned from this model."""
    ta = params.text_assignment
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(pairs, params.resources)
    source = load_model(pretrained)
    if "itc" not in source.config.heads:
        raise CheckpointError(f"{pretrained}: has no itc head, which text assignment draws its "
                              "negatives by")
    assigner = with_heads(source, ["ta", "itc"])
    for p in assigner.heads["itc"].parameters():
        p.requires_grad_(False)
    assigner.to(device)
    trained = {k for k in assigner.state_dict() if not k.startswith("heads.ta.")}
    run = make_run("text_assignment", data.split("train"), ta.train, params.seed,
                   modules={"model": assigner},
                   optims=[Optim(param_groups(assigner, trained, ta.train, ta.lr_scale))],
                   loss=Objective(assigner, TEXT_ASSIGNMENT, TASK_ONLY, 1.0,
                                  negative_rule=NegativeRule(hard_share=ta.hard_negatives)),
                   device=device,
                   precision=params.precision, log_path=log, key=(ta,),
                   inputs=(pairs, pretrained))
    summary = {"last_step": fit(run),
               "val_metric": assignment_accuracy(assigner, data, ta.train.batch_size, device,
                                                 params.seed, ta.hard_negatives)}
    with atomic_path(model) as tmp:
        save_model(assigner.cpu(), tmp)
    finish(run)
    return summary


@torch.no_grad()
def assignment_accuracy(model: VLM, data: PreparedData, batch_size: int, device: torch.device,
                        seed: int, hard_share: float) -> float:
    """The share of validation captions whose image text assignment picks right (first,
    second or neither; a third each), the draws seeded so every run asks the same."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    right = total = 0
    for batch in data.split("val").batches(batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            step = assign_step(model, batch, None, {}, hard_share=hard_share)
        right += int((step.logits[0].argmax(1) == step.choices["labels"]).sum())
        total += len(step.choices["labels"])
    model.train()
    return right / max(total, 1)


def task_teacher(params: Params, data: PreparedData, pretrained: Path,
                 assigned: Path | None = None) -> tuple[VLM, set[str] | None]:
    """The task teacher before fine-tuning, and the names of its tensors that come from the
    pre-trained teacher (all but a fresh task head); None when it is imported finished and
    needs no fine-tuning: an evlm task model, or X-VLM's fine-tuned model (retrieval, NLVR2)
    in the pre-trained teacher's shape. `assigned`: NLVR2's teacher starts from the model text
    assignment trained (its fusion layers already paired) instead of the pre-trained one."""
    tt, task = params.task_teacher, TASKS[params.task]
    if tt.checkpoint is not None:
        source = f"task_teacher.checkpoint {tt.checkpoint}"
        if tt.checkpoint_format == "xvlm":
            model = import_xvlm_task_teacher(tt.checkpoint, load_model(pretrained).config,
                                             heads=list(task.heads),
                                             num_answers=data.num_answers,
                                             image_size=data.meta["image_size"])
        else:
            model = load_model(tt.checkpoint)
        missing = [h for h in task.heads if h not in model.config.heads]
        if missing:
            raise CheckpointError(f"{source}: has no {missing[0]} head for task {task.name}")
        require_vocabulary(model, data.meta["vocab_size"], source, "the prepared data's tokenizer")
        require_positions(model, data.meta["max_text_len"], source)
        size, wanted = model.config.vision.image_size, data.meta["image_size"]
        if size != wanted:
            raise CheckpointError(f"{source}: takes {size} px images, the task data "
                                  f"{wanted} px (data.image_size)")
        if task.example_scores is not None and model.config.num_answers != data.num_answers:
            raise CheckpointError(f"{source}: its {task.name} head scores "
                                  f"{model.config.num_answers} answers, the task data has "
                                  f"{data.num_answers}")
        return model, None
    start = assigned or pretrained
    source = load_model(start)
    require_positions(source, data.meta["max_text_len"], f"the pre-trained teacher {start}")
    model = with_heads(source, list(task.heads), num_answers=data.num_answers,
                       image_size=data.meta["image_size"])
    # Every encoder tensor came from the pre-trained teacher (NLVR2's paired fusion layers
    # too), and so did a head it had in the same shape.
    kept = source.state_dict()
    return model, {k for k, v in model.state_dict().items() if not k.startswith("heads.")
                   or (k in kept and kept[k].shape == v.shape)}


def require_positions(model: VLM, needed: int, source: str) -> None:
    """The task's text must fit the model's position table; a longer table is kept as it is."""
    positions = model.config.text.max_positions
    if positions < needed:
        raise CheckpointError(f"{source}: has {positions} text positions, the task data "
                              f"{needed} (data.max_text_len)")


def run_teacher(params: Params, *, prepared: Path, pretrained: Path,
                assigned: Path | None = None, model: Path, log: Path) -> dict:
    tt = params.task_teacher
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(prepared, params.resources, params.augment)
    teacher, pretrained_names = task_teacher(params, data, pretrained, assigned)
    train = pretrained_names is not None
    summary = {"imported": not train}
    if train:
        teacher.to(device)
        # The pre-trained tensors may train slower than a fresh task head (lr_scale).
        run = make_run("teacher", data.split("train"), tt.train, params.seed,
                       modules={"model": teacher},
                       optims=[Optim(param_groups(teacher, pretrained_names, tt.train,
                                                  tt.lr_scale))],
                       loss=Objective(teacher, params.task, TASK_ONLY, 1.0,
                                      task_spec=task_for(params.task, data.meta,
                                                         tt.label_smoothing)),
                       device=device, precision=params.precision,
                       log_path=log, key=(tt, params.augment),
                       inputs=(prepared, assigned or pretrained),
                       augment=data.augmenter(params.augment))
        summary["last_step"] = fit(run)
    summary["val_metric"] = evaluate_task(teacher, data, "val", params.task,
                                          tt.train.batch_size, device)
    with atomic_path(model) as tmp:
        save_model(teacher.cpu(), tmp)
    if train:
        finish(run)
    else:
        empty_log(log)
    return summary
