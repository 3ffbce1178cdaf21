"""Running evlm and DVC in a project folder as a user would, for the end-to-end pipeline
tests: commands, which stages ran, editing a spec, reading a run's results."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from evlm_cli.core.results import EvaluateResults

REPO = Path(__file__).resolve().parents[2]
EVLM = [sys.executable, "-m", "evlm_cli"]


def sh(cmd, cwd, check=True, env_extra=None, **kw):
    env = dict(os.environ, DVC_NO_ANALYTICS="1", **(env_extra or {}))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kw)
    if check and res.returncode:
        raise AssertionError(f"{cmd} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def ran(output: str) -> set[str]:
    """The kinds of stage that ran ('prune', 'teacher', ...), from DVC's output."""
    names = re.findall(r"Running stage '([^']+)'", output)
    return {n.split("-")[1] if n.startswith("shared-") else n.rsplit("-", 1)[1] for n in names}


def edit_spec(path: Path, name: str | None = None, **changes) -> Path:
    spec = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = spec
        *keys, last = dotted.split(".")
        for k in keys:
            node = node.setdefault(k, {})
        node[last] = value
    if name:
        spec["name"] = name
        path = path.with_name(f"{name}.yaml")
    path.write_text(yaml.safe_dump(spec))
    return path


def results_of(project: Path, name: str) -> EvaluateResults:
    return EvaluateResults.read(project / f"runs/{name}/evaluate/metrics.json")


def copy_checkout(project: Path, target: Path) -> None:
    """Copy what a git clone of `project` would hold: not DVC's cache, its cached outputs
    (dvc.yaml's `outs`; metrics and plots are not cached) or evlm's resume folders."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    cached = {project / out for stage in stages.values() for out in stage.get("outs", [])}
    skipped = cached | {project / ".dvc/cache", project / ".dvc/tmp", project / ".evlm/work"}

    def ignore(folder, names):
        return [n for n in names if Path(folder) / n in skipped]

    shutil.copytree(project, target, ignore=ignore)


def changed_stages(project: Path, package: Path) -> set[str]:
    """The kinds `dvc status` lists after compiling with the evlm package at `package`."""
    sh([*EVLM, "compile", "specs/tiny_vqa.yaml"], project, env_extra={"PYTHONPATH": str(package)})
    status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)
    return ran("".join(f"Running stage '{name}'" for name in status))
