"""What holds the NLVR2 teacher back? Fine-tune it with a validation curve, and score each kind
of statement apart.

Reads a finished run of `specs/nlvr2_50pct.yaml` (the shared pairs, pre-trained teacher and
NLVR2 data under `--project`), then, in this process, with evlm's own functions:

  text assignment (optional, `--ta-epochs`): `recipe.teacher.run_text_assignment`, as the
  `text_assignment` stage runs it; or `--start MODEL`, another model to start from (the VQA
  task teacher);
  NLVR2 fine-tuning: the `teacher` stage's own function (`recipe.teacher.run_teacher`, from
  the text-assigned model where there is one), with the spec's task_teacher settings but
  `--epochs`/`--lr-scale`, the validation accuracy taken after every epoch;
  the validation accuracy of each template ("the left image contains ...", "the two shapes
  are the same ...") and of each kind of thing named (shape, colour, size, place).

`--statements-per-image N` prepares the NLVR2 data again with N statements per left image
instead of `data.nlvr2.STATEMENTS_PER_IMAGE` (the same images; more statements about them).
Prints one JSON line and writes it to `--out`.

    .venv/bin/python benchmarks/nlvr2_teacher.py --project . --epochs 8 --out runs/bench/nlvr2_base.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

import torch
import yaml

from evlm_cli.core.config import params_from_dict
from evlm_cli.data import nlvr2
from evlm_cli.data.captions import COLORS, SHAPES, SIZES
from evlm_cli.data.loader import open_prepared
from evlm_cli.models.checkpoint import load_model
from evlm_cli.models.vlm import TaskLogits
from evlm_cli.recipe import teacher as recipe
from evlm_cli.recipe.prepare import run_prepare
from evlm_cli.recipe.scoring import evaluate_task
from evlm_cli.training.loop import Callback, callbacks_installed, setup

# A statement's template, recognised from its words (nlvr2.THING_TEMPLATES, COMPARISON_TEMPLATES).
TEMPLATES = (("left", r"^the left image"), ("right", r"^the right image"),
             ("both", r"^both images"), ("only one", r"^only one"), ("no image", r"^no image"),
             ("not same", r"are not the same"), ("same", r"are the same"))


def kind_of(text: str) -> str:
    """The kind of thing a statement names (nlvr2.THINGS), or the fact a comparison compares."""
    if " same " in text:
        return text.split()[-1]
    words = text.split(" contains a ")[-1].split()
    if words[0] == "shape":
        return "place"
    if words[0] in COLORS:
        return "color shape" if len(words) > 1 and words[1] in SHAPES else "color"
    return "size" if words[0] in SIZES else "shape"


@torch.no_grad()
def accuracy_by_statement(model, data) -> dict[str, dict[str, float]]:
    """Validation accuracy of each template and of each kind of thing."""
    tokenizer, logits = data.tokenizer(), TaskLogits(model.eval(), "nlvr2")
    right, total = collections.Counter(), collections.Counter()
    for batch in data.split("val").batches(256):
        predicted = logits(batch["images"], batch["input_ids"], batch["attention_mask"]).argmax(1)
        correct = predicted == batch["targets"].argmax(1)
        for ids, mask, ok in zip(batch["input_ids"], batch["attention_mask"], correct, strict=True):
            text = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
            template = next(name for name, pattern in TEMPLATES if re.search(pattern, text))
            for key in (("template", template), ("thing", kind_of(text))):
                right[key] += int(ok)
                total[key] += 1
    model.train()
    out: dict[str, dict[str, float]] = {"template": {}, "thing": {}}
    for (group, name), count in sorted(total.items()):
        out[group][name] = round(right[group, name] / count, 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--project", type=Path, default=Path("."))
    ap.add_argument("--epochs", type=float, default=8, help="NLVR2 fine-tuning epochs")
    ap.add_argument("--lr-scale", type=float, default=None,
                    help="the body's lr share (default: the spec's task_teacher.lr_scale)")
    ap.add_argument("--ta-epochs", type=float, default=0, help="text assignment first (0: none)")
    ap.add_argument("--ta-lr", type=float, default=4e-4)
    ap.add_argument("--ta-lr-scale", type=float, default=0.5)
    ap.add_argument("--ta-hard", type=float, default=0.5)
    ap.add_argument("--statements-per-image", type=int, default=None)
    ap.add_argument("--start", type=Path, default=None,
                    help="a model to fine-tune from instead of the pre-trained teacher (another "
                         "task's teacher, e.g. VQA's); its fusion layers are paired")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/nlvr2_teacher"))
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    project = a.project
    raw = yaml.safe_load((project / "runs/nlvr2_50pct/params.yaml").read_text())
    raw["text_assignment"] = {"lr_scale": a.ta_lr_scale, "hard_negatives": a.ta_hard,
                              "train": {**raw["pretrain"]["train"], "epochs": a.ta_epochs,
                                        "lr": a.ta_lr}}
    teacher_section = raw["task_teacher"]
    raw["task_teacher"] = {**teacher_section, "lr_scale": a.lr_scale or teacher_section["lr_scale"],
                           "train": {**teacher_section["train"], "epochs": a.epochs}}
    params = params_from_dict(raw)
    pairs = next(project.glob("runs/shared/prepare_pairs-*/data"))
    pretrained = next(project.glob("runs/shared/teacher_pretrain-*/model"))
    prepared = next(p for p in project.glob("runs/shared/prepare-*/data")
                    if json.loads((p / "meta.json").read_text()).get("task") == "nlvr2")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.statements_per_image:
        nlvr2.pair_statements.__defaults__ = (a.statements_per_image,)
        prepared = a.work / f"data_{a.statements_per_image}_per_image"
        if not prepared.exists():
            run_prepare(params, pairs=pairs, data=prepared)
    start = time.time()
    result: dict = {"args": {k: str(v) for k, v in vars(a).items()}}
    assigned = a.start
    if a.ta_epochs:
        assigned = a.work / f"assigned_{a.ta_epochs}_{a.ta_lr}_{a.ta_lr_scale}_{a.ta_hard}"
        if not assigned.exists():
            result["text_assignment"] = recipe.run_text_assignment(
                params, pairs=pairs, pretrained=pretrained, model=assigned,
                log=a.work / "text_assignment_log.csv")
        result["text_assignment_seconds"] = round(time.time() - start)
    # the teacher stage itself, with the epochs and body lr asked, its loop hooked for the curve
    device = setup(params.seed, params.resources.threads, params.device)
    data = open_prepared(prepared, params.resources, params.augment)
    curve = result["curve"] = []

    class Curve(Callback):
        def after_backward(self, step, run):
            if (step + 1) % len(run.batches) == 0:
                model = run.modules["model"]
                curve.append({"epoch": (step + 1) // len(run.batches),
                              "val": evaluate_task(model, data, "val", "nlvr2", 256, device),
                              "seconds": round(time.time() - start)})
                model.train()
                print(json.dumps(curve[-1]), flush=True)

    finished = a.work / "teacher"
    with callbacks_installed(Curve()):
        recipe.run_teacher(params, prepared=prepared, pretrained=pretrained, assigned=assigned,
                           model=finished, log=a.work / "teacher_log.csv")
    teacher = load_model(finished)
    result["val"] = evaluate_task(teacher, data, "val", "nlvr2", 256, device)
    result["by_statement"] = accuracy_by_statement(teacher, data)
    result["seconds"] = round(time.time() - start)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
