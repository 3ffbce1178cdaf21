"""Resolved specs -> stages (from the registry) -> the top-level dvc.yaml, merged and pruned.

Shared kinds are named by a hash of everything they depend on, `shared-<kind>-<hash8>`, so
specs that agree upstream share one stage and its outputs. A spec's own stages are named
`<spec>-<kind>`. Each stage depends on its kind's code fingerprint (`evlm_cli.pipeline.codedeps`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from evlm_cli.core.config import PATH_KEYS
from evlm_cli.core.io import atomic_write_text
from evlm_cli.core.layout import CODE_DIR, PROJECT_LOCK, RUNS, SHARED, STATE, WORK_ROOT
from evlm_cli.core.packaged import MINILM
from evlm_cli.pipeline.codedeps import fingerprint_text
from evlm_cli.pipeline.registry import KINDS, StageKind, tracked_sections

# The command DVC runs: an entry point that exists wherever evlm is installed.
ENTRY_COMMAND = ("evlm", "stage")


@dataclass
class Stage:
    """One kind, instantiated for a spec: its name, params file and paths."""

    kind: StageKind
    name: str
    params_file: Path
    params: dict  # the content of params_file (the sections the kind reads, or the whole spec)
    inputs: dict[str, Path]
    outputs: dict[str, Path]
    user_files: list[Path]

    def paths(self, role: str) -> list[Path]:
        return [self.outputs[o.name] for o in self.kind.outputs if o.role == role]


    def to_dvc(self) -> dict:
        cmd = [*ENTRY_COMMAND, self.kind.name, "--params", str(self.params_file)]
        for arg, path in [*self.inputs.items(), *self.outputs.items()]:
            cmd += [f"--{arg}", str(path)]
        entry = {
            "cmd": shlex.join(cmd),
            "deps": list(dict.fromkeys([str(code_file(self.kind.name)), *map(str, self.inputs.values()),
                                        *map(str, self.user_files)])),
            "params": [{str(self.params_file): tracked_sections(self.kind)}],
        }
        if outs := self.paths("out"):
            entry["outs"] = list(map(str, outs))
        if metrics := self.paths("metrics"):
            entry["metrics"] = [{str(m): {"cache": False}} for m in metrics]
        if plots := self.paths("plots"):
            entry["plots"] = [{str(p): {"cache": False, "x": "step", "y": "loss"}} for p in plots]
        return entry


def subset(spec: dict, keys: list[str] | tuple[str, ...]) -> dict:
    """The spec restricted to the top-level `keys`."""
    return {k: spec[k] for k in keys if k in spec}


def user_files(spec: dict, kind: StageKind) -> list[Path]:
    """Files and folders the spec names in the sections a kind reads: DVC deps of its stages.

    Absolute paths and `minilm` (the packaged MiniLM) are left out: they are installed, not
    edited, and would tie dvc.yaml to one machine.
    """
    out = []
    for path_key in PATH_KEYS:
        if path_key.key[0] not in tracked_sections(kind):
            continue
        node = spec
        for k in path_key.key:
            node = node[k]
        for value in node if isinstance(node, list) else [node]:
            if value is not None and value != MINILM and not Path(value).is_absolute():
                out.append(Path(value))
    return out


def code_file(kind_name: str) -> Path:
    """The fingerprint of the code a kind's stages run (see `evlm_cli.pipeline.codedeps`)."""
    return CODE_DIR / f"{kind_name}.json"


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:8]


def plan(spec: dict) -> list[Stage]:
    """Every kind of the registry instantiated for one spec, upstream before downstream."""
    own = RUNS / spec["name"]
    # The shared stages (data, teachers, distillation) take shared_seed when it is set: the
    # runs of one spec's seeds share them (`spec.seed_runs`).
    upstream_spec = spec if spec.get("shared_seed") is None else {**spec,
                                                                  "seed": spec["shared_seed"]}
    stages: dict[str, Stage] = {}
    for kind in KINDS.values():
        if not kind.enabled(spec):
            continue
        refs = [ref.split(".") for ref in kind.inputs.values()]
        inputs = {arg: stages[k].outputs[o] for arg, (k, o) in zip(kind.inputs, refs, strict=True)}
        for arg, ref in kind.optional_inputs.items():
            k, o = ref.split(".")
            if k in stages:
                inputs[arg] = stages[k].outputs[o]
                refs.append([k, o])
        if kind.shared:
            # an optional input that is there names the stage too (NLVR2's teacher with text
            # assignment and without are two stages); one that is not leaves the name as it was
            upstream = sorted({stages[k].name for k, _ in refs})
            h = _digest(kind.name, subset(upstream_spec, tracked_sections(kind)), upstream)
            folder = SHARED / f"{kind.name}-{h}"
            name, params_file, params = f"shared-{kind.name}-{h}", folder / "params.yaml", \
                subset(upstream_spec, kind.sections)
        else:
            folder = own / kind.name
            name, params_file, params = f"{spec['name']}-{kind.name}", own / "params.yaml", spec
        stages[kind.name] = Stage(kind, name, params_file, params, inputs,
                                  {o.name: folder / o.path for o in kind.outputs},
                                  user_files(spec, kind))
    return list(stages.values())


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
              if not any(k.startswith(f"{n}-") and k[len(n) + 1:] in KINDS for n in names)}
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


# What the top-level plots draw from each run's own logs: (plot, stage kinds, columns).
RUN_PLOTS = (("training loss", ("prune", "finetune"), ("loss",)),
             ("expected vs target sparsity", ("prune",),
              ("expected_sparsity/overall", "target_sparsity")))


def top_level_plots(stages: dict) -> list[dict]:
    """dvc.yaml's top-level plots: per run, its prune and fine-tuning losses in one plot and
    pruning's expected sparsity against the target in another, so `dvc plots show` and
    `dvc plots diff` draw a run's curves together (each stage also declares its own log)."""
    logs: dict[str, dict[str, str]] = {}
    for name, entry in stages.items():
        if name.startswith("shared-"):
            continue
        for item in entry.get("plots", []):
            path = next(iter(item)) if isinstance(item, dict) else item
            run, kind = name.rsplit("-", 1)
            logs.setdefault(run, {})[kind] = path
    plots = []
    for run in sorted(logs):
        for title, kinds, columns in RUN_PLOTS:
            files = {logs[run][kind]: list(columns) for kind in kinds if kind in logs[run]}
            if files:
                plots.append({f"{run}: {title}": {"x": "step", "y": files,
                                                  "title": f"{run}: {title}"}})
    return plots


def write_code_fingerprints(root: Path = Path(".")) -> None:
    """One file per kind listing the modules its stages run and their hashes."""
    # Resume checkpoints are large and never versioned; nor is the project lock.
    ignore = root / STATE / ".gitignore"
    wanted = f"{WORK_ROOT.relative_to(STATE)}/\n{PROJECT_LOCK.relative_to(STATE)}\n"
    if not ignore.exists() or ignore.read_text() != wanted:
        atomic_write_text(ignore, wanted)
    for kind in KINDS.values():
        path = root / code_file(kind.name)
        text = fingerprint_text(kind.module)
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)


def compile_specs(specs: list[dict], root: Path = Path(".")) -> list[list[Stage]]:
    """Write params files and code fingerprints; merge the specs' stages into root/dvc.yaml."""
    plans = [plan(spec) for spec in specs]
    write_code_fingerprints(root)
    for stage_list in plans:
        for st in stage_list:
            path = root / st.params_file
            text = yaml.safe_dump(st.params, sort_keys=False)
            if not path.exists() or path.read_text() != text:
                atomic_write_text(path, text)
    dvc_yaml = root / "dvc.yaml"
    existing = (yaml.safe_load(dvc_yaml.read_text()) or {}) if dvc_yaml.exists() else {}
    merged = merge(existing.get("stages") or {}, specs, plans)
    document = {**existing, "stages": merged, "plots": top_level_plots(merged)}
    atomic_write_text(dvc_yaml, yaml.safe_dump(document, sort_keys=False))
    lock = root / "dvc.lock"
    if lock.exists():
        data = yaml.safe_load(lock.read_text()) or {}
        kept = {k: v for k, v in (data.get("stages") or {}).items() if k in merged}
        if kept != (data.get("stages") or {}):
            atomic_write_text(lock, yaml.safe_dump({**data, "stages": kept}, sort_keys=False))
    return plans
