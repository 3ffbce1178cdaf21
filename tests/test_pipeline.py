"""End to end: `evlm run` on a tiny spec in a folder outside the repository that holds only the spec."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
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


@pytest.fixture
def project(tmp_path):
    """A user's folder: the tiny spec and nothing else (evlm makes it a DVC project)."""
    folder = tmp_path / "work"
    (folder / "specs").mkdir(parents=True)
    shutil.copy(REPO / "tests/specs/tiny_vqa.yaml", folder / "specs/tiny_vqa.yaml")
    return folder


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


def test_run_rerun_partial_reruns_and_sharing(project):
    spec = project / "specs/tiny_vqa.yaml"
    first = sh([*EVLM, "run", str(spec)], project)
    assert "made" in first.stdout and "a DVC project (without git)" in first.stdout
    assert ran(first.stdout) == {"prepare", "teacher", "teacher_eval", "distill", "prune",
                                 "finetune", "evaluate"}
    assert "retention" in first.stdout and "speedup" in first.stdout  # the summary table
    metrics = json.loads((project / "runs/tiny_vqa/evaluate/metrics.json").read_text())
    assert 0 <= metrics["value"] <= 1 and metrics["params"] < metrics["teacher_params"]
    masks = json.loads((project / "runs/tiny_vqa/prune/masks.json").read_text())
    assert masks["params_after"] == metrics["params"] < masks["params_before"]

    again = sh([*EVLM, "run", str(spec)], project)
    assert ran(again.stdout) == set()

    edit_spec(spec, **{"finetune.train.lr": 0.0003})
    assert ran(sh([*EVLM, "run", str(spec)], project).stdout) == {"finetune", "evaluate"}

    edit_spec(spec, **{"prune.target_sparsity": 0.3})
    assert ran(sh([*EVLM, "run", str(spec)], project).stdout) == {"prune", "finetune", "evaluate"}

    other = edit_spec(spec, name="tiny_sweep", **{"prune.target_sparsity": 0.6})
    assert ran(sh([*EVLM, "run", str(other)], project).stdout) == {"prune", "finetune", "evaluate"}

    # DVC's own views work on what evlm compiled
    assert "tiny_sweep-evaluate" in sh([sys.executable, "-m", "dvc", "dag"], project).stdout
    shown = sh([sys.executable, "-m", "dvc", "metrics", "show"], project).stdout
    assert "runs/tiny_vqa/evaluate/metrics.json" in shown
    assert ran(sh([sys.executable, "-m", "dvc", "repro"], project).stdout) == set()

    diff = sh([*EVLM, "diff", "tiny_vqa", "tiny_sweep", "--plot", "diff.png"], project).stdout
    assert re.search(r"prune\.target_sparsity\s+0\.3\s+0\.6", diff)
    assert (project / "diff.png").read_bytes()[:4] == b"\x89PNG"

    shown = sh([*EVLM, "show", "tiny_vqa"], project).stdout
    assert re.search(r"tiny_vqa-prune\s+up to date", shown) and "modal-adaptive to 30%" in shown
    assert "retention" in shown


def changed_stages(project: Path, package: Path) -> set[str]:
    """The kinds `dvc status` lists after compiling with the evlm package at `package`."""
    sh([*EVLM, "compile", "specs/tiny_vqa.yaml"], project, env_extra={"PYTHONPATH": str(package)})
    status = json.loads(sh([sys.executable, "-m", "dvc", "status", "--json"], project).stdout)
    return ran("".join(f"Running stage '{name}'" for name in status))


def test_code_dependencies_are_exact(project, tmp_path):
    """Editing a module reruns the stages whose run functions reach it through imports."""
    sh([*EVLM, "run", "specs/tiny_vqa.yaml"], project)
    copy = tmp_path / "package"  # a throwaway copy of evlm, imported instead of the installed one
    shutil.copytree(REPO / "evlm_cli", copy / "evlm_cli", ignore=shutil.ignore_patterns("__pycache__"))
    assert changed_stages(project, copy) == set()

    with open(copy / "evlm_cli/compress/l0.py", "a") as f:  # only pruning imports the L0 gates
        f.write("\n# an edit\n")
    # DVC lists prune alone: finetune and evaluate follow once prune's outputs change
    assert changed_stages(project, copy) == {"prune"}

    with open(copy / "evlm_cli/errors.py", "a") as f:  # every stage imports the errors
        f.write("\n# an edit\n")
    assert changed_stages(project, copy) == {"prepare", "teacher", "teacher_eval", "distill",
                                              "prune", "finetune", "evaluate"}
    shown = sh([*EVLM, "show", "tiny_vqa"], project, env_extra={"PYTHONPATH": str(copy)}).stdout
    assert re.search(r"tiny_vqa-prune\s+would rerun: changed deps: \.evlm/code/prune\.json", shown)
    assert changed_stages(project, REPO) == set()  # the installed code again: all up to date


def test_killed_prune_stage_resumes_from_its_checkpoint(project):
    spec = edit_spec(project / "specs/tiny_vqa.yaml",
                     **{"prune.train": {"epochs": 1, "batch_size": 8, "max_steps": 60,
                                        "checkpoint_every": 5}})
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.Popen([*EVLM, "run", str(spec)], cwd=project, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    ckpts = []
    while time.time() < deadline and not ckpts:
        ckpts = list(project.glob(".evlm/work/prune-*/resume.pt"))
        time.sleep(0.2)
    assert ckpts, "the prune stage never wrote a checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)  # evlm, dvc and the stage, at once
    proc.wait()
    assert not (project / "runs/tiny_vqa/prune/masks.json").exists()

    res = sh([*EVLM, "run", str(spec)], project)
    step = int(re.search(r"prune: resuming from step (\d+) of 60", res.stdout + res.stderr).group(1))
    assert step >= 5
    assert ran(res.stdout) == {"prune", "finetune", "evaluate"}
    log = (project / "runs/tiny_vqa/prune/log.csv").read_text().splitlines()
    assert len(log) == 1 + 60 and log[-1].startswith("60,")  # header + every step once
    assert json.loads((project / "runs/tiny_vqa/prune/masks.json").read_text())["params_after"] > 0


def test_a_failing_stage_is_named_with_its_log(project):
    (project / "bad").mkdir()
    (project / "bad/config.json").write_text("{not json")
    (project / "bad/model.safetensors").write_bytes(b"garbage")
    spec = edit_spec(project / "specs/tiny_vqa.yaml", **{"teacher.checkpoint": "bad"})
    res = sh([*EVLM, "run", str(spec)], project, check=False)
    assert res.returncode == 1
    assert re.search(r"evlm run: stage shared-teacher-\w{8} failed .*runs/tiny_vqa/run\.log", res.stderr)
    log = (project / "runs/tiny_vqa/run.log").read_text()
    # the stage's own one-line error, naming the file, and no traceback
    assert "error: stage teacher: bad/config.json: not a valid evlm model config" in log
    assert "Traceback" not in log
    assert not list(project.glob("runs/shared/teacher-*/model"))  # nothing half-written
