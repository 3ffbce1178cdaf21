"""What every stage of the recipe shares: device, building the teacher, the loss, evaluation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from evlm_cli.compress import distill as kd
from evlm_cli.data.loader import PreparedData
from evlm_cli.errors import CheckpointError
from evlm_cli.models.checkpoint import check_state, load_model, read_weights
from evlm_cli.models.config import ENCODERS, VLMConfig, make_config
from evlm_cli.models.importers import import_hf_bert, import_timm_vit, import_xvlm, load_hf_bert_dir
from evlm_cli.models.vlm import VLM
from evlm_cli.spec import local_path
from evlm_cli.tasks import TASKS
from evlm_cli.train import EpochBatches, Optim, Run, seed_everything, trim_text

WORK_ROOT = Path(".evlm") / "work"  # undeclared resume folders, outside DVC's outputs


def setup(spec: dict) -> torch.device:
    """Seed, threads and device from the spec: `auto` is CUDA when there is one.

    Seeding here, before a stage builds anything, makes what it creates before training
    (the L0 gates' tie-breaking noise, KD projections) the same on every run: the process
    starts from an entropy-seeded generator.
    """
    seed_everything(spec.get("seed", 0))  # evaluation stages draw nothing and do not read it
    if spec["resources"]["threads"]:
        torch.set_num_threads(spec["resources"]["threads"])
    if spec["device"] == "cuda" or (spec["device"] == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def fingerprint(path: Path) -> str:
    """A hash of a file's or a directory's contents (a path alone may hold other results)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for f in files:
        h.update(str(f.relative_to(path) if Path(path).is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def work_dir(stage: str, *configs, inputs: tuple[Path, ...] = ()) -> Path:
    """A resume folder keyed by the stage's settings and the contents of its inputs."""
    key = [configs, [fingerprint(p) for p in inputs]]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return WORK_ROOT / f"{stage}-{digest[:12]}"


def make_run(stage: str, spec: dict, data: PreparedData, optim_cfg: dict, *,
             modules: dict[str, nn.Module], optims: list[Optim], loss, device: torch.device,
             log_path: Path, key: tuple = (), inputs: tuple[Path, ...] = ()) -> Run:
    """The training run of one stage on the train split, as every training stage sets it up.

    `key` (the stage's settings) and the contents of `inputs` name the resume folder.
    """
    batches = EpochBatches(data.split("train"), optim_cfg["batch_size"], spec["seed"],
                           answer_balance=optim_cfg["answer_balance"])
    return Run(modules=modules, optims=optims, loss=loss, batches=batches, optim_cfg=optim_cfg,
               work_dir=work_dir(stage, spec["seed"], *key, inputs=inputs), log_path=log_path,
               desc=stage, seed=spec["seed"], device=device, autocast=device.type == "cuda")


def teacher_config(spec: dict, data: PreparedData, max_positions: int) -> VLMConfig:
    t = spec["teacher"]
    tokenizer = data.tokenizer()
    return make_config(vision=t["vision"], text=t["text"], fusion=t["fusion"],
                       image_size=data.meta["image_size"], patch_size=t["vision"]["patch_size"],
                       stem=t["vision"]["stem"], vocab_size=len(tokenizer),
                       max_positions=max_positions,
                       heads=[spec["task"]], num_answers=data.num_answers, pool=t["pool"])


def _load_partial(model: VLM, state: dict[str, Tensor], source: str) -> None:
    check_state(model, state, source, strict=False)
    unknown = [k for k in state if k not in model.state_dict()]
    if unknown:
        raise CheckpointError(f"{source}: tensor {unknown[0]!r} has no place in the model")
    model.load_state_dict(state, strict=False)


def build_teacher(spec: dict, data: PreparedData) -> tuple[VLM, set[str]]:
    """The teacher before task training, and the names of the tensors that came pretrained."""
    t = spec["teacher"]
    if t["checkpoint"] and t["checkpoint_format"] == "evlm":
        return load_model(t["checkpoint"]), set()
    torch.manual_seed(spec["seed"])
    text_dir = local_path(t["init"]["text"])
    hf_text = load_hf_bert_dir(text_dir) if text_dir else None
    # Pretrained position embeddings keep their length; otherwise the prepared text length.
    positions = hf_text[1]["max_position_embeddings"] if hf_text else data.meta["max_text_len"]
    model = VLM(teacher_config(spec, data, positions))
    loaded: set[str] = set()
    if t["checkpoint"]:  # X-VLM / EfficientVLM layout
        tx = t["text"]
        hf = dict(hidden_size=tx["width"], num_attention_heads=tx["heads"],
                  intermediate_size=tx["ffn"], vocab_size=model.config.text.vocab_size,
                  max_position_embeddings=model.config.text.max_positions,
                  num_hidden_layers=tx["layers"])
        state, _ = import_xvlm(read_weights(t["checkpoint"]), t["vision"]["heads"], hf,
                               image_size=data.meta["image_size"], source=str(t["checkpoint"]))
        # Pre-training heads (ITM, ITC) have no place in a task model; the task head is new.
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        _load_partial(model, state, str(t["checkpoint"]))
        return model, set(state)
    if hf_text:
        bert, hf = hf_text
        n_text, n_fusion, n_bert = t["text"]["layers"], t["fusion"]["layers"], hf["num_hidden_layers"]
        fusion_ids = None
        if t["init"]["fusion_from_text"]:
            # X-VLM starts its cross layers from the BERT layers above the text ones; when the
            # BERT is too shallow for that, from its top layers.
            first = n_text if n_text + n_fusion <= n_bert else max(0, n_bert - n_fusion)
            fusion_ids = list(range(first, first + n_fusion))
        state, _ = import_hf_bert(bert, hf, text_layers=n_text, fusion_layers=fusion_ids,
                                  source=text_dir)
        _load_partial(model, state, text_dir)
        loaded |= set(state)
    if t["init"]["vision"]:
        state, _ = import_timm_vit(read_weights(t["init"]["vision"]), t["vision"]["heads"],
                                   image_size=data.meta["image_size"], source=str(t["init"]["vision"]))
        _load_partial(model, state, str(t["init"]["vision"]))
        loaded |= set(state)
    return model, loaded


def model_inputs(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return batch["images"], batch["input_ids"], batch["attention_mask"]


class Objective:
    """Task loss + weighted distillation terms (+ the sparsity penalty when pruning).

    `modules` holds what it trains besides the student (the learned hidden-state projections),
    for the optimiser and the checkpoint.
    """

    def __init__(self, student: VLM, task: str, weights: dict, temperature: float,
                 teacher: VLM | None = None, layer_maps: dict[str, list[int]] | None = None,
                 gates: nn.Module | None = None, constraint: nn.Module | None = None):
        self.student, self.task, self.weights, self.temperature = student, task, weights, temperature
        use_teacher = teacher is not None and any(weights[k] for k in ("logits", "hidden", "attention"))
        self.teacher = [teacher] if use_teacher else []
        self.gates, self.constraint = gates, constraint
        self.layer_maps = layer_maps or {}
        self.hidden = None
        self.modules: dict[str, nn.Module] = {}
        if self.teacher and weights["hidden"]:
            widths = {e: (student.config.encoder(e).width, teacher.config.encoder(e).width)
                      for e in ENCODERS}
            self.hidden = self.modules["hidden_maps"] = kd.HiddenDistiller(widths)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    def __call__(self, batch: dict[str, Tensor], step: int, total: int) -> tuple[Tensor, dict]:
        w = self.weights
        want_h, want_a = bool(self.hidden), bool(self.teacher and w["attention"])
        gates = self.gates() if self.gates is not None and self.constraint.uses_gates else None
        out = self.student(*model_inputs(batch), gates=gates, output_hidden=want_h,
                           output_attentions=want_a)
        logits = self.student.logits(self.task, out)
        terms = {"task": TASKS[self.task].loss(logits, batch["targets"])}
        if self.teacher:
            teacher = self.teacher[0]
            with torch.no_grad():
                t_out = teacher(*model_inputs(batch), output_hidden=want_h, output_attentions=want_a)
                t_logits = teacher.logits(self.task, t_out)
            if w["logits"]:
                terms["logits"] = kd.logits_kd(logits, t_logits, self.temperature)
            masks = {"vision": None, "text": batch["attention_mask"], "fusion": batch["attention_mask"]}
            if want_h:
                terms["hidden"] = sum(
                    self.hidden.loss(out.encoder(e).hidden_states, t_out.encoder(e).hidden_states,
                                     self.layer_maps[e], masks[e], encoder=e)
                    for e in ENCODERS) / len(ENCODERS)
            if want_a:
                maps = [(out.encoder(e).attentions, t_out.encoder(e).attentions, self.layer_maps[e])
                        for e in ENCODERS]
                maps.append((out.fusion.cross_attentions, t_out.fusion.cross_attentions,
                             self.layer_maps["fusion"]))
                terms["attention"] = sum(kd.attention_kd(s, t, m) for s, t, m in maps) / len(maps)
        loss = sum(w[k] * v for k, v in terms.items())
        logs = {k: v.item() for k, v in terms.items()}
        if self.constraint is not None and self.constraint.uses_gates:
            loss = loss + self.constraint.loss(step, total)
            logs.update(self.constraint.log_values(step, total))
        return loss, logs


@torch.inference_mode()
def evaluate_task(model: VLM, data: PreparedData, split: str, task: str, batch_size: int,
                  device: torch.device) -> float:
    """The task metric on a whole split (VQA accuracy for VQA)."""
    model.eval().to(device)
    scores, count = 0.0, 0
    for batch in data.split(split).batches(batch_size):
        batch = {k: v.to(device) for k, v in trim_text(batch).items()}
        logits = model.logits(task, model(*model_inputs(batch)))
        scores += TASKS[task].example_scores(logits, batch["targets"]).sum().item()
        count += batch["targets"].shape[0]
    return scores / max(count, 1)
