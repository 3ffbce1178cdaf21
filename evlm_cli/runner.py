"""`dvc repro` as a child process group: streamed to the terminal, logged, stoppable with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from evlm_cli.errors import EvlmError


class StageFailed(Exception):
    def __init__(self, stage: str | None, status: int, log: Path):
        self.stage, self.status, self.log = stage, status, log
        where = f"stage {stage}" if stage else "dvc repro"
        super().__init__(f"{where} failed (exit {status}); the full output is in {log}")


def dvc_env() -> dict[str, str]:
    """No analytics; this interpreter's folder first on PATH so stage `python` is ours."""
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def ensure_dvc_repo(root: Path) -> None:
    if not (root / ".dvc").is_dir():
        raise EvlmError(f"{root.resolve()}: not a DVC project (no .dvc/); run `git init && dvc init` "
                        "there, or run evlm from the repository root")


def repro(targets: list[str], log_path: Path, root: Path = Path("."), force: bool = False) -> None:
    """Run `dvc repro TARGETS`, copying its output to the terminal and to `log_path`."""
    ensure_dvc_repo(root)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dvc", "repro", *(["--force"] if force else []), *targets]
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
