"""A stage run with test hooks in its training loop, as a program of its own.

    python -m tests.helpers.hooked_stage [--kill-after STEP] [--dump-grads FILE] KIND ARGS...

runs `evlm stage KIND ARGS...` in this process with callbacks installed in the loop (see
`evlm_cli.training.loop.Callback`): `--kill-after` kills the process with SIGKILL right after
the checkpoint of that step, as a crash or the OOM killer would; `--dump-grads` writes the first
step's gradients, averaged over the processes, to a safetensors file (the first process does).

Under torchrun every process installs the hooks. A stage whose params ask for several
processes would relaunch itself as plain `evlm stage`, without them, so `command` starts
torchrun itself, with the command `evlm_cli.training.distributed.relaunch` uses.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

from evlm_cli.core.io import atomic_path
from evlm_cli.core.ranks import is_main
from evlm_cli.training.distributed import torchrun_command
from evlm_cli.training.loop import Callback, Run

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.helpers.hooked_stage"


class KillAfterCheckpoint(Callback):
    """SIGKILL this process once the checkpoint of step `step` is written."""

    def __init__(self, step: int):
        self.step = step

    def after_checkpoint(self, step: int, run: Run) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DumpFirstGradients(Callback):
    """Every gradient of the first step, named `module.parameter`, written to `path`."""

    def __init__(self, path: Path):
        self.path = path

    def after_backward(self, step: int, run: Run) -> None:
        from safetensors.torch import save_file

        if step != 0 or not is_main():
            return
        grads = {f"{name}.{key}": p.grad.detach().float().cpu().contiguous()
                 for name, module in run.modules.items()
                 for key, p in module.named_parameters() if p.grad is not None}
        with atomic_path(self.path) as tmp:
            save_file(grads, str(tmp))


def command(kind: str, argv: list[str], *, processes: int = 1, kill_after: int | None = None,
            dump_grads: Path | None = None) -> list[str]:
    """The command line of this program; under torchrun with `processes` > 1."""
    hooks = []
    if kill_after is not None:
        hooks += ["--kill-after", str(kill_after)]
    if dump_grads is not None:
        hooks += ["--dump-grads", str(dump_grads)]
    if processes == 1:
        return [sys.executable, "-m", MODULE, *hooks, kind, *argv]
    return torchrun_command(MODULE, [*hooks, kind, *argv], processes)


def environment() -> dict[str, str]:
    """This process's environment, one torch thread, and the repository importable (the
    program runs in a project folder)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def main(argv: list[str] | None = None) -> int:
    from evlm_cli.pipeline.entry import run_stage
    from evlm_cli.training.loop import callbacks_installed

    parser = argparse.ArgumentParser(prog="hooked_stage", description=__doc__.split("\n")[0])
    parser.add_argument("--kill-after", type=int, help="SIGKILL after this step's checkpoint")
    parser.add_argument("--dump-grads", type=Path, help="the first step's gradients go here")
    parser.add_argument("kind")
    parser.add_argument("stage_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    hooks: list[Callback] = []
    if args.kill_after is not None:
        hooks.append(KillAfterCheckpoint(args.kill_after))
    if args.dump_grads is not None:
        hooks.append(DumpFirstGradients(args.dump_grads))
    with callbacks_installed(*hooks):
        return run_stage(args.kind, args.stage_args)


if __name__ == "__main__":
    sys.exit(main())
