"""The same spec, seed, threads and processes give the same models and metrics: from scratch
in two folders, even when one of the runs is killed in the middle of a stage and run again.

Two `evlm run`s of the tiny VQA spec, each from scratch in a folder of its own: one
uninterrupted, and one whose whole process group (evlm, DVC and the stage) is SIGKILLed once
pruning has written a resume checkpoint, then run again. Every file they write must be equal
byte for byte, except for what measures the machine: latencies and speedups, how they were
taken, and the throughput columns of log.csv. (A third run, from scratch and uninterrupted,
would cost the suite a minute and show nothing these two do not: any difference between runs
from scratch would show here too.)
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.helpers.pipeline import EVLM, REPO, sh

pytestmark = pytest.mark.e2e

# Columns of log.csv and fields of the results that measure the machine, not the model.
TIMING_COLUMNS = {"examples_per_s", "data_wait", "gflop_per_s", "peak_share"}
TIMING_FIELDS = {"latency_ms", "speedup", "timing", "over_flops_ratio", "speedup_over_pytorch_teacher",
                 "speedup_over_fastest_teacher"}


def tiny_folder(root: Path) -> Path:
    """A folder holding the tiny spec, its pruning long enough to be killed between two of
    its checkpoints."""
    (root / "specs").mkdir(parents=True)
    spec = yaml.safe_load((REPO / "tests/specs/tiny_vqa.yaml").read_text())
    spec["prune"]["train"].update(max_steps=12, checkpoint_every=2)
    spec.pop("export")  # ONNX Runtime's own threads are not what this test is about
    (root / "specs/tiny_vqa.yaml").write_text(yaml.safe_dump(spec))
    return root


def run(folder: Path) -> subprocess.CompletedProcess:
    return sh([*EVLM, "run", "specs/tiny_vqa.yaml"], folder)


def without_timing(value):
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_FIELDS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def outputs(folder: Path) -> dict[str, object]:
    """Every file the run wrote under runs/, as what must not differ between runs."""
    found = {}
    for path in sorted((folder / "runs").rglob("*")):
        if not path.is_file() or path.name == "run.log":
            continue
        name = str(path.relative_to(folder))
        if path.suffix == ".csv":
            with path.open() as f:
                found[name] = [{k: v for k, v in row.items() if k not in TIMING_COLUMNS}
                               for row in csv.DictReader(f)]
        elif path.name == "metrics.json":
            found[name] = without_timing(json.loads(path.read_text()))
        else:
            found[name] = path.read_bytes()
    return found


def differences(a: dict, b: dict) -> list[str]:
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


def killed_while_pruning(folder: Path) -> None:
    """`evlm run` in its own process group, SIGKILLed (all of it) once pruning has written a
    resume checkpoint, as a crash or the OOM killer would take it."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    proc = subprocess.Popen([*EVLM, "run", "specs/tiny_vqa.yaml"], cwd=folder, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not list(folder.glob(".evlm/work/prune-*/resume.pt")):
            assert proc.poll() is None, "the run ended before pruning wrote a checkpoint"
            assert time.monotonic() < deadline, "pruning wrote no checkpoint in 10 minutes"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        gone_for_good(proc.pid)


def gone_for_good(group: int) -> None:
    """Wait until no process of the group is left, zombies included. DVC takes the lock of a
    process whose PID still exists for a live one, and the killed DVC's PID exists until
    whatever adopted it reaps it: on some machines an init that reaps only every second or so.
    """
    deadline = time.monotonic() + 60
    while any(member_of(pid, group) for pid in psutil.pids()):
        assert time.monotonic() < deadline, "the killed processes were not reaped in a minute"
        time.sleep(0.05)


def member_of(pid: int, group: int) -> bool:
    try:
        return os.getpgid(pid) == group
    except ProcessLookupError:
        return False


def test_a_spec_run_twice_from_scratch_once_killed_and_resumed_ends_the_same(tmp_path):
    first, resumed = (tiny_folder(tmp_path / name) for name in ("first", "resumed"))
    run(first)
    killed_while_pruning(resumed)
    assert not (resumed / "runs/tiny_vqa/evaluate/metrics.json").exists()
    again = run(resumed)
    assert "resuming from step" in again.stdout + again.stderr
    reference = outputs(first)
    assert any(name.endswith("model.safetensors") for name in reference)
    assert "runs/tiny_vqa/evaluate/metrics.json" in reference
    assert not differences(reference, outputs(resumed)), "the killed and resumed run differs"
