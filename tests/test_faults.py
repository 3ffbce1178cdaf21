"""A stage killed with SIGKILL leaves nothing that looks finished, and its rerun resumes and
ends exactly where an uninterrupted run ends.

Each training kind runs three times on a tiny project: once uninterrupted; once as its own
process, killed (SIGKILL, as a crash or the OOM killer would) right after the checkpoint of
step 4 (a callback the test installs in that process's training loop); and once more, which
must resume from step 4.
"""

import csv
import errno
import signal
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from evlm_cli.pipeline.entry import run_stage
from evlm_cli.spec.load import load_spec
from tests.helpers import hooked_stage
from tests.helpers.prepared_project import prepared_project
from tests.helpers.project import TINY

pytestmark = pytest.mark.e2e

STEPS, EVERY, KILL_AT = 8, 4, 4
# Columns of log.csv that measure the machine, not the training.
TIMING = {"examples_per_s", "data_wait", "gflop_per_s", "peak_share"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    spec = load_spec(TINY)
    for section in ("pretrain", "task_teacher", "distill", "prune", "finetune"):
        train = spec[section]["train"]
        train.update(max_steps=STEPS, checkpoint_every=EVERY, batch_size=16)
    # the same spec with augmentation and two data workers (prepare reads neither)
    augmented = {**spec, "augment": {"crop_scale": [0.5, 1.0], "flip": True,
                                     "randaugment": {"ops": 2, "magnitude": 9}},
                 "resources": {**spec["resources"], "data_workers": 2}}
    # the dense baseline with finetune's loss weights instead of its default (prune's)
    logits_only = {**spec, "dense": {**spec["dense"], "weights": {
        "task": 1.0, "logits": 1.0, "hidden": 0.0, "attention": 0.0}}}
    with prepared_project(tmp_path_factory.mktemp("faults"),
                          {"params.yaml": spec, "augmented.yaml": augmented,
                           "logits_only.yaml": logits_only}) as root:
        yield root


# Each kind's inputs (made by the kinds before it, uninterrupted) and outputs.
STAGES = {
    "teacher_pretrain": ({"pairs": "pairs"}, ("model",)),
    "distill": ({"pairs": "pairs", "teacher": "teacher_pretrain-whole/model"}, ("model",)),
    "teacher": ({"prepared": "data", "pretrained": "teacher_pretrain-whole/model"}, ("model",)),
    "prune": ({"prepared": "data", "student": "distill-whole/model",
               "teacher": "teacher-whole/model"}, ("model", "masks")),
    "finetune": ({"prepared": "data", "student": "prune-whole/model",
                  "teacher": "teacher-whole/model"}, ("model",)),
    "dense": ({"prepared": "data", "student": "distill-whole/model",
               "teacher": "teacher-whole/model"}, ("model",)),
}
FILES = {"model": "model", "masks": "masks.json", "log": "log.csv"}


def arguments(kind: str, run: str, params: str = "params.yaml") -> list[str]:
    inputs, outputs = STAGES[kind]
    args = ["--params", params]
    for name, path in inputs.items():
        args += [f"--{name}", path]
    for name in (*outputs, "log"):
        args += [f"--{name}", f"{kind}-{run}/{FILES[name]}"]
    return args


def killed_stage(root: Path, kind: str, run: str, params: str = "params.yaml"
                 ) -> subprocess.CompletedProcess:
    """The stage as its own process, as DVC runs it (so that SIGKILL kills only it), killed
    right after its checkpoint of step KILL_AT."""
    command = hooked_stage.command(kind, arguments(kind, run, params), kill_after=KILL_AT)
    return subprocess.run(command, cwd=root, env=hooked_stage.environment(), capture_output=True,
                          text=True, timeout=600)


def log_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.parametrize("kind", [*STAGES, "prune+augment"])
def test_a_killed_stage_resumes_and_ends_as_an_uninterrupted_one(project, kind, capsys):
    """prune+augment: pruning with crop, flip and RandAugment, its batches built by two data
    workers: the resumed run draws the same augmented batches, and the same gate noise from
    the global generator the workers leave alone."""
    kind, _, variant = kind.partition("+")
    params = "augmented.yaml" if variant else "params.yaml"
    whole, resumed = f"whole{variant}", f"resumed{variant}"
    assert run_stage(kind, arguments(kind, whole, params)) == 0  # in this process: no kill asked
    killed = killed_stage(project, kind, resumed, params)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # nothing that DVC or evlm would take for a finished output
    for name in (*STAGES[kind][1], "log"):
        assert not (project / f"{kind}-{resumed}" / FILES[name]).exists(), name
    assert run_stage(kind, arguments(kind, resumed, params)) == 0  # the rerun, in this process
    said = capsys.readouterr()
    assert f"resuming from step {KILL_AT} of {STEPS}" in said.out + said.err
    a = load_file(project / f"{kind}-{whole}/model/model.safetensors")
    b = load_file(project / f"{kind}-{resumed}/model/model.safetensors")
    assert a.keys() == b.keys()
    differing = [k for k in a if not (a[k] == b[k]).all()]
    assert not differing, f"{kind}: resumed weights differ from the uninterrupted run's: {differing}"
    assert log_rows(project / f"{kind}-{whole}/log.csv") == log_rows(
        project / f"{kind}-{resumed}/log.csv"), f"{kind}: log.csv differs (timing columns aside)"
    if "masks" in STAGES[kind][1]:
        assert (project / f"{kind}-{whole}/masks.json").read_text() == (
            project / f"{kind}-{resumed}/masks.json").read_text()
    if variant:  # augmentation changed what it trained on
        plain = load_file(project / f"{kind}-whole/model/model.safetensors")
        assert any(not (plain[k] == a[k]).all() for k in a)


def test_the_dense_baseline_distils_what_pruning_distils(project):
    """dense.weights defaults to prune's: the depth-only baseline learns the teacher's hidden
    states and attention, as the pruned student does while it is pruned. With finetune's
    weights it learns the logits alone."""
    for kind in ("teacher_pretrain", "distill", "teacher"):  # inputs, unless made already
        if not (project / f"{kind}-whole/model").exists():
            assert run_stage(kind, arguments(kind, "whole")) == 0
    assert run_stage("dense", arguments("dense", "kd")) == 0
    assert run_stage("dense", arguments("dense", "logits", "logits_only.yaml")) == 0
    with_kd, logits_only = (log_rows(project / f"dense-{run}/log.csv") for run in ("kd", "logits"))
    assert len(with_kd) == len(logits_only) == STEPS
    for row in with_kd:
        assert min(float(row[term]) for term in ("logits", "hidden", "attention")) > 0, row
    assert "logits" in logits_only[0]
    assert "hidden" not in logits_only[0] and "attention" not in logits_only[0]


def test_a_full_disk_keeps_the_previous_outputs(project, monkeypatch, capsys):
    """A write that fails (the disk is full) fails the stage on one line and leaves the
    outputs of the previous run as they were, with no temporary file beside them."""
    args = arguments("teacher_pretrain", "full")
    assert run_stage("teacher_pretrain", args) == 0
    weights = project / "teacher_pretrain-full/model/model.safetensors"
    before = weights.read_bytes()
    capsys.readouterr()

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("evlm_cli.models.checkpoint.save_file", no_space)
    assert run_stage("teacher_pretrain", args) == 2
    said = capsys.readouterr().err.strip().splitlines()
    assert said[-1] == "error: stage teacher_pretrain: [Errno 28] No space left on device"
    assert weights.read_bytes() == before
    assert not [p for p in (project / "teacher_pretrain-full").rglob("*") if ".tmp" in p.name]
