"""Resolved specs -> DVC stages -> the top-level dvc.yaml (merged, shared, stale entries pruned).

Upstream stages (prepare, teacher, teacher_eval, distill) are named by a hash of everything
they depend on, `shared-<stage>-<hash8>`, so specs that agree upstream share one stage and its
outputs. The per-task stages (prune, finetune, evaluate) are named `<spec>-<stage>`.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evlm_cli.io import atomic_write_text
from evlm_cli.spec import MINILM

RUNS = Path("runs")
SHARED = RUNS / "shared"

# The params keys each stage reads, and nothing more: DVC reruns a stage when one changes.
PARAM_KEYS = {
    "prepare": ["seed", "task", "data", "teacher.init.text"],
    "teacher": ["seed", "task", "device", "resources", "teacher"],
    "teacher_eval": ["task", "device", "resources", "evaluate"],
    "distill": ["seed", "task", "device", "resources", "student", "distill"],
    "prune": ["seed", "task", "device", "resources", "prune"],
    "finetune": ["seed", "task", "device", "resources", "finetune"],
    "evaluate": ["task", "device", "resources", "evaluate"],
}

# How a stage runs, not what it computes: in its params.yaml, but neither a DVC param nor part
# of a shared stage's hash, so changing the thread count retrains nothing.
UNTRACKED = ("resources",)


def tracked(kind: str) -> list[str]:
    """The params keys of a stage whose change must rerun it."""
    return [k for k in PARAM_KEYS[kind] if k not in UNTRACKED]


# The code each stage runs: editing pruning code reruns prune and what follows, not the teacher.
_MODEL = ["evlm_cli/models", "evlm_cli/compress/groups.py"]
_TRAIN = [*_MODEL, "evlm_cli/train.py", "evlm_cli/tasks", "evlm_cli/data/loader.py",
          "evlm_cli/data/tokenizer.py", "evlm_cli/recipe/common.py", "evlm_cli/compress/distill.py"]
CODE = {
    "prepare": ["evlm_cli/data", "evlm_cli/tasks"],
    "teacher": [*_TRAIN, "evlm_cli/recipe/teacher.py"],
    "teacher_eval": [*_TRAIN, "evlm_cli/recipe/evaluate.py", "evlm_cli/compress/measure.py"],
    "distill": [*_TRAIN, "evlm_cli/recipe/distill.py"],
    "prune": [*_TRAIN, "evlm_cli/recipe/prune.py", "evlm_cli/compress/l0.py",
              "evlm_cli/compress/slice.py"],
    "finetune": [*_TRAIN, "evlm_cli/recipe/finetune.py"],
    "evaluate": [*_TRAIN, "evlm_cli/recipe/evaluate.py", "evlm_cli/compress/measure.py"],
}


@dataclass
class Stage:
    name: str
    params_file: Path
    params: dict  # the content of params_file (the keys this stage reads, or the whole spec)
    args: dict[str, Path]  # --name path, in order
    inputs: list[Path]
    outs: list[Path] = field(default_factory=list)
    metrics: list[Path] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    kind: str = ""

    def to_dvc(self) -> dict:
        script = f"stages/{self.kind}.py"
        cmd = ["python", script, "--params", str(self.params_file)]
        for k, v in self.args.items():
            cmd += [f"--{k}", str(v)]
        entry = {
            "cmd": shlex.join(cmd),
            "deps": [script, *CODE[self.kind], *map(str, self.inputs)],
            "params": [{str(self.params_file): tracked(self.kind)}],
        }
        if self.outs:
            entry["outs"] = list(map(str, self.outs))
        if self.metrics:
            entry["metrics"] = [{str(m): {"cache": False}} for m in self.metrics]
        if self.plots:
            entry["plots"] = [{str(p): {"cache": False, "x": "step", "y": "loss"}} for p in self.plots]
        return entry


def subset(spec: dict, keys: list[str]) -> dict:
    """The spec restricted to `keys` (dotted keys keep their nesting)."""
    out: dict = {}
    for key in keys:
        parts = key.split(".")
        src, dst = spec, out
        for p in parts[:-1]:
            src = src[p]
            dst = dst.setdefault(p, {})
        dst[parts[-1]] = src[parts[-1]]
    return out


def user_files(spec: dict, keys: list[tuple[str, ...]]) -> list[Path]:
    """Files and folders the spec names inside the project: DVC deps, so editing them reruns.

    Absolute paths and `minilm` (the packaged MiniLM) are left out: they are installed, not
    edited, and would tie dvc.yaml to one machine.
    """
    out = []
    for key in keys:
        node = spec
        for k in key:
            node = node[k]
        for value in node if isinstance(node, list) else [node]:
            if value is not None and value != MINILM and not Path(value).is_absolute():
                out.append(Path(value))
    return out


PREPARE_FILES = [("data", k) for k in ("train", "val", "test", "image_root", "answer_list",
                                       "tokenizer")]
TEACHER_FILES = [("teacher", "checkpoint"), ("teacher", "init", "text"), ("teacher", "init", "vision")]


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def plan(spec: dict) -> list[Stage]:
    """The seven stages of one spec, upstream ones keyed by the hash of their inputs."""
    name = spec["name"]
    own = RUNS / name
    stages: list[Stage] = []

    def shared(kind: str, upstream: list[Stage]) -> tuple[str, Path, dict]:
        params = subset(spec, PARAM_KEYS[kind])
        h = _digest(kind, subset(spec, tracked(kind)), [s.name for s in upstream])
        folder = SHARED / f"{kind}-{h}"
        return f"shared-{kind}-{h}", folder, params

    n, d, params = shared("prepare", [])
    prepare = Stage(n, d / "params.yaml", params, {"out": d / "data"},
                    user_files(spec, PREPARE_FILES), outs=[d / "data"], kind="prepare")
    n, d, params = shared("teacher", [prepare])
    teacher = Stage(n, d / "params.yaml", params,
                    {"prepared": prepare.outs[0], "out": d / "model", "log": d / "log.csv"},
                    [prepare.outs[0], *user_files(spec, TEACHER_FILES)], outs=[d / "model"],
                    plots=[d / "log.csv"], kind="teacher")
    n, d, params = shared("teacher_eval", [prepare, teacher])
    teacher_eval = Stage(n, d / "params.yaml", params,
                         {"prepared": prepare.outs[0], "teacher": teacher.outs[0],
                          "metrics": d / "metrics.json"},
                         [prepare.outs[0], teacher.outs[0]], metrics=[d / "metrics.json"],
                         kind="teacher_eval")
    n, d, params = shared("distill", [prepare, teacher])
    distill = Stage(n, d / "params.yaml", params,
                    {"prepared": prepare.outs[0], "teacher": teacher.outs[0], "out": d / "model",
                     "log": d / "log.csv"},
                    [prepare.outs[0], teacher.outs[0]], outs=[d / "model"], plots=[d / "log.csv"],
                    kind="distill")
    stages += [prepare, teacher, teacher_eval, distill]

    params_file = own / "params.yaml"
    p = own / "prune"
    prune = Stage(f"{name}-prune", params_file, spec,
                  {"prepared": prepare.outs[0], "student": distill.outs[0], "teacher": teacher.outs[0],
                   "out": p / "model", "masks": p / "masks.json", "log": p / "log.csv"},
                  [prepare.outs[0], distill.outs[0], teacher.outs[0]],
                  outs=[p / "model"], metrics=[p / "masks.json"], plots=[p / "log.csv"], kind="prune")
    f = own / "finetune"
    finetune = Stage(f"{name}-finetune", params_file, spec,
                     {"prepared": prepare.outs[0], "student": prune.outs[0], "teacher": teacher.outs[0],
                      "out": f / "model", "log": f / "log.csv"},
                     [prepare.outs[0], prune.outs[0], teacher.outs[0]],
                     outs=[f / "model"], plots=[f / "log.csv"], kind="finetune")
    e = own / "evaluate"
    evaluate = Stage(f"{name}-evaluate", params_file, spec,
                     {"prepared": prepare.outs[0], "student": finetune.outs[0],
                      "teacher": teacher.outs[0], "teacher_metrics": teacher_eval.metrics[0],
                      "masks": prune.metrics[0], "metrics": e / "metrics.json"},
                     [prepare.outs[0], finetune.outs[0], teacher.outs[0], teacher_eval.metrics[0],
                      prune.metrics[0]],
                     metrics=[e / "metrics.json"], kind="evaluate")
    return stages + [prune, finetune, evaluate]


def _produced(entry: dict) -> set[str]:
    paths = set(entry.get("outs", []))
    for group in ("metrics", "plots"):
        for item in entry.get(group, []):
            paths |= set(item) if isinstance(item, dict) else {item}
    return paths


def merge(existing: dict, specs: list[dict], plans: list[list[Stage]]) -> dict:
    """Replace the given specs' stages, keep every other spec's, drop unreferenced shared ones."""
    names = {s["name"] for s in specs}
    stages = {k: v for k, v in existing.items()
              if not any(k.startswith(f"{n}-") and k[len(n) + 1:] in PARAM_KEYS for n in names)}
    for stage_list in plans:
        for st in stage_list:
            stages[st.name] = st.to_dvc()
    while True:  # shared stages that nothing depends on any more are stale
        needed = {d for v in stages.values() for d in v.get("deps", [])}
        stale = [k for k, v in stages.items() if k.startswith("shared-") and not _produced(v) & needed]
        if not stale:
            return stages
        for k in stale:
            del stages[k]


def compile_specs(specs: list[dict], root: Path = Path(".")) -> list[list[Stage]]:
    """Write params files and merge the specs' stages into root/dvc.yaml (pruning dvc.lock)."""
    plans = [plan(spec) for spec in specs]
    for stage_list in plans:
        for st in stage_list:
            path = root / st.params_file
            text = yaml.safe_dump(st.params, sort_keys=False)
            if not path.exists() or path.read_text() != text:
                atomic_write_text(path, text)
    dvc_yaml = root / "dvc.yaml"
    existing = (yaml.safe_load(dvc_yaml.read_text()) or {}) if dvc_yaml.exists() else {}
    merged = merge(existing.get("stages") or {}, specs, plans)
    atomic_write_text(dvc_yaml, yaml.safe_dump({**existing, "stages": merged}, sort_keys=False))
    lock = root / "dvc.lock"
    if lock.exists():
        data = yaml.safe_load(lock.read_text()) or {}
        kept = {k: v for k, v in (data.get("stages") or {}).items() if k in merged}
        if kept != (data.get("stages") or {}):
            atomic_write_text(lock, yaml.safe_dump({**data, "stages": kept}, sort_keys=False))
    return plans
