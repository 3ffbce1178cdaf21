"""The prune stage with two processes, timed and profiled: steps per second, and the time
spent in gradient communication, for whichever evlm is on PYTHONPATH (so two trees, before and
after a change to how gradients are averaged, can be compared on the same inputs).

    python benchmarks/ddp_speed.py PROJECT SPEC [--steps 40] [--profile-from 10] [--out DIR]

PROJECT is a folder where SPEC (a path in it: a VQA spec with a prune stage) has run: its
prepared data, distilled student and task teacher are the inputs. The spec is resolved by the
evlm on PYTHONPATH, so each tree reads it with its own keys. The stage runs under torchrun with 2
processes, `--steps` steps; rank 0's steps from `--profile-from` on are profiled with
torch.profiler, and the time of every gloo all-reduce is summed, on whatever thread it ran:
under DDP on its communication thread, overlapping the backward pass, so that time is not all
added to the step. Prints steps per second (median over the profiled steps, from log.csv) and
communication milliseconds per step.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> int:
    """One torchrun process: the stage with a profiler around rank 0's later steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from evlm_cli.core.ranks import is_main
    from evlm_cli.pipeline.entry import run_stage
    from evlm_cli.training.loop import Callback, callbacks_installed

    class Profiled(Callback):
        def __init__(self) -> None:
            self.prof = profile(activities=[ProfilerActivity.CPU])

        def after_backward(self, step: int, run) -> None:
            if not is_main():
                return
            if step == args.profile_from - 1:
                self.prof.__enter__()
            elif step == args.steps - 1:
                self.prof.__exit__(None, None, None)
                events = self.prof.key_averages()
                # gloo's own event is the collective's work; c10d::allreduce_ wraps its launch
                comm = sum(e.cpu_time_total for e in events if e.key == "gloo:all_reduce")
                names = sorted({e.key for e in events if "reduce" in e.key.lower()})
                steps = args.steps - args.profile_from
                Path(args.report).write_text(json.dumps(
                    {"comm_ms_per_step": comm / 1000 / steps, "reduce_events": names}))

    torch.set_num_threads(1)
    with callbacks_installed(Profiled()):
        return run_stage("prune", args.stage_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--worker" in argv:  # started by torchrun: its options, "--", the stage's arguments
        cut = argv.index("--")
        inner = argparse.ArgumentParser()
        for option in ("--steps", "--profile-from"):
            inner.add_argument(option, type=int)
        inner.add_argument("--report")
        inner.add_argument("--worker", action="store_true")
        args = inner.parse_args(argv[:cut])
        args.stage_args = argv[cut + 1:]
        return worker(args)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("spec")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--profile-from", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from evlm_cli.pipeline.compile import plan
    from evlm_cli.spec.load import load_spec

    project = args.project.resolve()
    os.chdir(project)  # the spec's paths are the project's
    params = load_spec(args.spec)
    params["resources"].update(processes=2, threads=1)
    params["prune"]["train"].update(max_steps=args.steps, checkpoint_every=10 * args.steps)
    out = args.out or Path(tempfile.mkdtemp(prefix="evlm-ddp-speed-"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    stage = {s.kind.name: s for s in plan(params)}["prune"]
    stage_args = ["--params", str(out / "params.yaml"),
                  *(x for name, path in stage.inputs.items()
                    for x in (f"--{name}", str(project / path))),
                  "--model", str(out / "model"), "--masks", str(out / "masks.json"),
                  "--log", str(out / "log.csv")]
    report = out / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", str(HERE), "--worker", "--steps", str(args.steps),
               "--profile-from", str(args.profile_from), "--report", str(report), "--",
               *stage_args]
    env = dict(os.environ, EVLM_TORCHRUN="1", OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    if done.returncode:
        print(done.stdout[-3000:], done.stderr[-3000:])
        return 1
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))[args.profile_from:]
    batch = params["prune"]["train"]["batch_size"]
    steps_per_s = statistics.median(float(r["examples_per_s"]) for r in rows) / batch
    found = json.loads(report.read_text())
    print(json.dumps({"steps_per_s": steps_per_s, **found, "out": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
