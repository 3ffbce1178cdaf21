"""The stage registry: every kind of DVC stage, declared once.

A declaration says which params sections a kind reads, which artifacts of other kinds it
takes, what it writes (outputs, metrics, plots) and which function runs it. The compiler
(`evlm_cli.pipeline.compile`), the DVC command (`evlm stage KIND ...`) and the stage entry
(`evlm_cli.pipeline.entry`) are all derived from these declarations, and so are the code dependencies
(`evlm_cli.pipeline.codedeps`), and the files a stage depends on: those the spec names in the
sections it reads (`config.PATH_KEYS`). Adding a kind means adding a declaration here and
the library code.

This module imports neither torch nor the library: the run functions are named, not imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Output:
    """One thing a stage writes, under the stage's folder."""

    name: str  # the run function's keyword argument and the --option of the DVC command
    path: str  # relative to the stage's folder
    role: str = "out"  # "out": cached by DVC; "metrics" and "plots": small, git-tracked


@dataclass(frozen=True)
class StageKind:
    name: str
    doc: str
    run: str  # "module:function"; called as function(params, **inputs, **outputs)
    sections: tuple[str, ...]  # the params sections it reads (typed as `config.Params`)
    inputs: dict[str, str] = field(default_factory=dict)  # argument -> "kind.output"
    outputs: tuple[Output, ...] = ()
    # Inputs from kinds a spec may leave out: given when that kind is in the spec's plan,
    # None otherwise.
    optional_inputs: dict[str, str] = field(default_factory=dict)
    # A params section that switches the kind on: absent or null leaves it out of the plan.
    enabled_by: str | None = None
    # A training kind: with resources.processes > 1 it runs under torchrun (evlm_cli.training.distributed).
    trains: bool = False
    # Shared kinds are named by a hash of their params and upstream stages, so specs that
    # agree on them share one stage; the others belong to one spec.
    shared: bool = False

    @property
    def module(self) -> str:
        return self.run.split(":")[0]

    @property
    def arguments(self) -> tuple[str, ...]:
        return (*self.inputs, *self.optional_inputs, *(o.name for o in self.outputs))

    def enabled(self, spec: dict) -> bool:
        return self.enabled_by is None or spec.get(self.enabled_by) is not None


# How a stage runs, not what it computes: read by the stage, but neither a DVC param nor part
# of a shared stage's hash, so changing the thread count retrains nothing.
UNTRACKED_SECTIONS = ("resources",)

_RUNNING = ("seed", "device", "precision", "resources")
_TRAINING = ("seed", "task", "device", "precision", "resources", "augment")

# The paper's graph: pre-training and distillation are task-agnostic and shared by every task;
# a task fine-tunes its own teacher and prunes the shared student.
KINDS: dict[str, StageKind] = {k.name: k for k in [
    StageKind(
        "prepare_pairs", "read the pre-training image-text pairs once; write tensors and the "
        "tokenizer every task uses",
        "evlm_cli.recipe.prepare:run_prepare_pairs", ("seed", "pairs"),
        outputs=(Output("data", "data"),), shared=True),
    StageKind(
        "teacher_pretrain", "pre-train the teacher on the pairs (ITC, ITM, MLM), or import one",
        "evlm_cli.recipe.teacher:run_teacher_pretrain", (*_RUNNING, "teacher", "pretrain"),
        inputs={"pairs": "prepare_pairs.data"},
        outputs=(Output("model", "model"), Output("log", "log.csv", "plots")), shared=True,
        trains=True),
    StageKind(
        "distill", "a shallower student from the pre-trained teacher's layers, trained on the "
        "pairs to match it (task-agnostic)",
        "evlm_cli.recipe.distill:run_distill", (*_RUNNING, "pretrain", "student", "distill"),
        inputs={"pairs": "prepare_pairs.data", "teacher": "teacher_pretrain.model"},
        outputs=(Output("model", "model"), Output("log", "log.csv", "plots")), shared=True,
        trains=True),
    StageKind(
        "prepare", "read the task dataset once; write tensors and answers, tokenised as the "
        "pairs are",
        "evlm_cli.recipe.prepare:run_prepare", ("seed", "task", "data"),
        inputs={"pairs": "prepare_pairs.data"},
        outputs=(Output("data", "data"),), shared=True),
    StageKind(
        "text_assignment", "NLVR2's domain pre-training (X-VLM's text assignment): the "
        "pre-trained teacher, fusion layers paired, learns on the pairs which of two images a "
        "caption describes",
        "evlm_cli.recipe.teacher:run_text_assignment", (*_RUNNING, "text_assignment"),
        inputs={"pairs": "prepare_pairs.data", "pretrained": "teacher_pretrain.model"},
        outputs=(Output("model", "model"), Output("log", "log.csv", "plots")), shared=True,
        enabled_by="text_assignment", trains=True),
    StageKind(
        "teacher", "fine-tune the pre-trained teacher on the task (NLVR2: after text "
        "assignment, where the spec asks for it), or import a task teacher",
        "evlm_cli.recipe.teacher:run_teacher", (*_TRAINING, "task_teacher"),
        inputs={"prepared": "prepare.data", "pretrained": "teacher_pretrain.model"},
        optional_inputs={"assigned": "text_assignment.model"},
        outputs=(Output("model", "model"), Output("log", "log.csv", "plots")),
        shared=True, trains=True),
    StageKind(
        "teacher_eval", "the teacher's metric on the test split, size, FLOPs and latency",
        "evlm_cli.recipe.evaluate:run_teacher_eval", ("task", "device", "resources", "evaluate"),
        inputs={"prepared": "prepare.data", "teacher": "teacher.model"},
        outputs=(Output("metrics", "metrics.json", "metrics"),
                 Output("predictions", "predictions.json")), shared=True),
    StageKind(
        "dense", "the distilled student, not pruned, trained on the task with KD from the task "
        "teacher (by default pruning's terms: hidden states and attention too): "
        "the depth-only baseline evaluate scores",
        "evlm_cli.recipe.finetune:run_dense", (*_TRAINING, "finetune", "dense"),
        inputs={"prepared": "prepare.data", "student": "distill.model",
                "teacher": "teacher.model"},
        outputs=(Output("model", "model"), Output("log", "log.csv", "plots")),
        shared=True, enabled_by="dense", trains=True),
    StageKind(
        "prune", "the distilled student with a fresh task head: L0 gates under the sparsity "
        "budget, KD from the task teacher, then the gated units sliced out",
        "evlm_cli.recipe.prune:run_prune", (*_TRAINING, "prune"),
        inputs={"prepared": "prepare.data", "student": "distill.model",
                "teacher": "teacher.model"},
        outputs=(Output("model", "model"), Output("masks", "masks.json", "metrics"),
                 Output("log", "log.csv", "plots")), trains=True),
    StageKind(
        "finetune", "the sliced student recovers with the task loss and KD from the teacher",
        "evlm_cli.recipe.finetune:run_finetune", (*_TRAINING, "finetune"),
        inputs={"prepared": "prepare.data", "student": "prune.model",
                "teacher": "teacher.model"},
        outputs=(Output("model", "model"), Output("log", "log.csv", "plots")),
        trains=True),
    StageKind(
        "export", "the fine-tuned student as ONNX (fp32, and int8 when asked), checked for parity",
        "evlm_cli.recipe.export:run_export", ("task", "resources", "export"),
        inputs={"prepared": "prepare.data", "student": "finetune.model"},
        outputs=(Output("onnx", "onnx"),), enabled_by="export"),
    StageKind(
        "evaluate", "the student's metric, retention, size, FLOPs, speedup and sparsity; the "
        "dense distilled student scored and timed alongside, to split both into depth and "
        "pruning",
        "evlm_cli.recipe.evaluate:run_evaluate", ("task", "device", "resources", "evaluate"),
        inputs={"prepared": "prepare.data", "student": "finetune.model",
                "teacher": "teacher.model", "teacher_metrics": "teacher_eval.metrics",
                "masks": "prune.masks", "dense": "distill.model"},
        optional_inputs={"onnx": "export.onnx", "dense_model": "dense.model"},
        outputs=(Output("metrics", "metrics.json", "metrics"),
                 Output("predictions", "predictions.json"))),
]}

# The kind whose finished stage means a spec's run is complete.
FINAL_KIND = "evaluate"


def tracked_sections(kind: StageKind) -> list[str]:
    """The params sections of a kind whose change must rerun it."""
    return [s for s in kind.sections if s not in UNTRACKED_SECTIONS]
