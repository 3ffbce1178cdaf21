"""`dvc repro` as a child process group: streamed to the terminal, logged, stoppable with Ctrl-C."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from evlm_cli.core.errors import EvlmError
from evlm_cli.core.layout import PROJECT_LOCK


@contextlib.contextmanager
def project_lock(root: Path = Path(".")) -> Iterator[None]:
    """One evlm at a time in a project: a second `evlm run` waits, saying for whom (stderr).

    Two runs at once would rewrite dvc.yaml under each other (each compiles its own specs
    in) and race DVC for its lock. The lock is an flock, so the kernel frees it when its
    holder exits, however it ends: a killed run never leaves the project locked.
    """
    path = root / PROJECT_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another evlm"
            print(f"evlm: waiting for {holder} to finish in this project ({path})",
                  file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"evlm (pid {os.getpid()})")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


class StageFailed(Exception):
    def __init__(self, stage: str | None, status: int, log: Path):
        self.stage, self.status, self.log = stage, status, log
        where = f"stage {stage}" if stage else "dvc repro"
        super().__init__(f"{where} failed (exit {status}); the full output is in {log}")


def dvc_env() -> dict[str, str]:
    """No analytics; this interpreter's folder first on PATH, so stages run this evlm."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _dvc(args: list[str], root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=dvc_env(),
                          capture_output=True, text=True)


def ensure_dvc_project(root: Path) -> str | None:
    """Make `root` a DVC project if it is none yet; say what was done, or None.

    Inside a git repository DVC versions with git (a subfolder of one gets `--subdir`);
    elsewhere it runs without one, so a folder holding only a spec is enough. A subfolder of a
    DVC project is refused: its stages belong in that project's dvc.yaml.
    """
    here = root.resolve()
    if (here / ".dvc").is_dir():
        return None
    parent = next((p for p in here.parents if (p / ".dvc").is_dir()), None)
    if parent is not None:
        raise EvlmError(f"{here}: inside the DVC project {parent}; run evlm there")
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root,
                             capture_output=True, text=True)
        git_top = Path(top.stdout.strip()).resolve() if top.returncode == 0 else None
    except FileNotFoundError:  # no git installed: a project without one
        git_top = None
    if git_top is None:
        args, how = ["init", "--no-scm"], "without git"
    elif git_top == here:
        args, how = ["init"], "with git"
    else:
        args, how = ["init", "--subdir"], "as a subfolder of a git repository"
    done = _dvc([*args, "--quiet"], root)
    if done.returncode:
        raise EvlmError(f"{here}: dvc init failed: {_last_line(done)}")
    return f"made {here} a DVC project ({how})"


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = (done.stderr or done.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


def stage_status(stages: list[str], root: Path = Path(".")) -> dict[str, list[str]]:
    """For each stage, why DVC would rerun it ([] when it is up to date)."""
    done = _dvc(["status", "--json", *stages], root)
    if done.returncode:
        raise EvlmError(f"dvc status failed: {_last_line(done)}")
    changed = json.loads(done.stdout or "{}")
    out = {}
    for name in stages:
        reasons = []
        for item in changed.get(name, []):
            if isinstance(item, dict):
                for what, paths in item.items():
                    reasons.append(f"{what}: " + ", ".join(paths) if isinstance(paths, dict)
                                   else what)
            else:
                reasons.append(str(item))
        out[name] = reasons
    return out


def repro(targets: list[str], log_path: Path, root: Path = Path("."), force: bool = False,
          remote: str | None = None) -> None:
    """Run `dvc repro TARGETS`, copying its output to the terminal and to `log_path`.

    With `remote`, stages are shared through that DVC remote instead (`pipeline.remote`).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    how = ["dvc", "repro"] if remote is None else ["evlm_cli.pipeline.remote", "--remote", remote]
    cmd = [sys.executable, "-m", *how, *(["--force"] if force else []), *targets]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=dvc_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        tail = b""
        try:
            # Raw chunks, not lines: progress bars redraw with '\r' and must show as they come.
            while chunk := os.read(proc.stdout.fileno(), 65536):
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
                log.write(chunk)
                tail = (tail + chunk)[-20000:]
            status = proc.wait()
        except KeyboardInterrupt:
            _stop_group(proc)
            raise
    if status:
        found = re.findall(rb"failed to reproduce '([^']+)'", tail)
        raise StageFailed(found[-1].decode() if found else None, status, log_path)


def _stop_group(proc: subprocess.Popen) -> None:
    """Interrupt DVC and the stage it runs (the whole process group), then kill if it lingers."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
