"""Multi-process training under torchrun: who this process is, the process group, and the
gradient average that makes N processes train as one.

`resources.processes` above 1 makes a training stage re-launch itself under torchrun
(`relaunch`). Each process then trains on its share of every global batch (`train.batch_size`
stays the global batch, so the recipe does not change with the process count).

The training loop puts every module that descends (student, L0 gates, KD projections) under
one module whose forward returns the loss (`loop.TrainStep`), wrapped by PyTorch's
DistributedDataParallel (`data_parallel`): its reducer averages their gradients in buckets
while the backward pass still runs. The Lagrange multipliers ascend; they stay outside it,
and `average_gradients` all-reduces theirs after the backward pass.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

from evlm_cli.core.ranks import world

if TYPE_CHECKING:  # torch is imported where it is used
    import torch
    from torch import nn

# Set by `relaunch` in the processes it starts, so that they never relaunch again.
LAUNCHED_ENV = "EVLM_TORCHRUN"


# Where a launcher tells the nodes to meet when the spec does not (`resources.rendezvous`).
RENDEZVOUS_ENV = "EVLM_RENDEZVOUS"


def torchrun_command(module: str, args: list[str], processes: int, nodes: int = 1,
                     rendezvous: str | None = None, run_id: str = "evlm") -> list[str]:
    """torchrun running `python -m module args...` in `processes` processes on this node; with
    `nodes` above 1, one agent of `nodes` meeting at the c10d `rendezvous` (host:port) under
    `run_id`, which every node must give alike.

    "--" ends torchrun's own options: it would read an argument such as a stage's `--log` as
    an abbreviation of its `--log-dir`.
    """
    where = ["--standalone"] if nodes == 1 else [
        f"--nnodes={nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous}",
        f"--rdzv-id={run_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where,
            f"--nproc-per-node={processes}", "-m", module, "--", *args]


def rendezvous_of(spec_value: str | None, env: dict[str, str] | None = None) -> str:
    """Where the nodes meet: the spec's `resources.rendezvous`, else the launcher's
    environment (EVLM_RENDEZVOUS, else MASTER_ADDR:MASTER_PORT)."""
    from evlm_cli.core.errors import EvlmError

    env = os.environ if env is None else env
    found = spec_value or env.get(RENDEZVOUS_ENV) or (
        f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29400')}" if env.get("MASTER_ADDR")
        else None)
    if not found:
        raise EvlmError("resources.nodes above 1 needs a rendezvous every node reaches: set "
                        f"resources.rendezvous (host:port) or {RENDEZVOUS_ENV} in each node's "
                        "environment")
    return found


# The port the rendezvous takes on a Slurm job's first node when the spec names none.
SLURM_RENDEZVOUS_PORT = 29400


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `node07`, `node[07-09,12]`, `a,b` or
    `gpu[1-2],cpu3` (what `scontrol show hostnames` would print first)."""
    head = nodelist.strip()
    bracket, comma = head.find("["), head.find(",")
    if bracket == -1 or (comma != -1 and comma < bracket):
        return head.split(",")[0]
    first = head[bracket + 1:].split(",")[0].split("-")[0].rstrip("]")
    return head[:bracket] + first


def launch_command(kind: str, argv: list[str], processes: int, nodes: int = 1,
                   rendezvous: str | None = None, launcher: str = "none",
                   env: dict[str, str] | None = None) -> list[str]:
    """The command that runs stage `kind` in `processes` processes on each of `nodes` nodes:
    torchrun on this node (every node runs the same command), or, with the `slurm` launcher
    and several nodes, srun starting one torchrun on each node of the job's allocation.

    The nodes' agents agree on a run id hashed from the stage and its arguments.
    """
    from evlm_cli.core.errors import EvlmError

    env = os.environ if env is None else env
    run_id = "evlm-" + hashlib.sha256(" ".join([kind, *argv]).encode()).hexdigest()[:16]
    stage = ["stage", kind, *argv]
    if nodes == 1:
        return torchrun_command("evlm_cli", stage, processes)
    if launcher != "slurm":
        return torchrun_command("evlm_cli", stage, processes, nodes, rendezvous_of(rendezvous, env),
                                run_id)
    if "SLURM_JOB_ID" not in env or "SLURM_JOB_NODELIST" not in env:
        raise EvlmError("resources.launcher slurm: not inside a Slurm allocation (no "
                        "SLURM_JOB_ID): run `evlm run` from an sbatch script or under salloc")
    endpoint = rendezvous or env.get(RENDEZVOUS_ENV) or (
        f"{first_host(env['SLURM_JOB_NODELIST'])}:{SLURM_RENDEZVOUS_PORT}")
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
            *torchrun_command("evlm_cli", stage, processes, nodes, endpoint, run_id)]


def relaunch(kind: str, argv: list[str], processes: int, nodes: int = 1,
             rendezvous: str | None = None, launcher: str = "none") -> None:
    """Replace this process with the command that runs the same stage in several processes
    (`launch_command`).

    The process is replaced (exec), not wrapped, so DVC's Ctrl-C or SIGTERM reaches torchrun
    (or srun) directly, which stops every worker: nothing is left orphaned.
    """
    os.environ[LAUNCHED_ENV] = "1"
    command = launch_command(kind, argv, processes, nodes, rendezvous, launcher)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


def should_relaunch(processes: int, nodes: int = 1) -> bool:
    return (processes > 1 or nodes > 1) and world()[1] == 1 and not os.environ.get(LAUNCHED_ENV)


def init(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun; return this rank's device."""
    import torch

    if world()[1] == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` under DistributedDataParallel when several processes train, else itself.

    Buffers are not broadcast: each process keeps its own batch-norm statistics, as it did
    when it trained alone on its share. Every parameter inside must receive a gradient at
    every step (no `find_unused_parameters`): the training kinds' losses reach all of them.
    """
    if world()[1] == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():
        # Newer torch deprecates broadcast_buffers for forward_sync_buffers, whose False still
        # syncs the buffers once at init, and advises keeping broadcast_buffers=False for
        # rank-local buffers until an init option exists.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated",
                                category=FutureWarning)
        return DistributedDataParallel(module, device_ids=[device.index]
                                       if device.type == "cuda" else None,
                                       broadcast_buffers=False)


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks, in one all-reduce.

    A parameter without a gradient on every rank keeps none, as it would in one process; one
    with a gradient on some ranks only (a data-dependent path) counts zero on the others.
    """
    import torch

    if world()[1] == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    device = params[0].device
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                      for p in params] + [torch.tensor([float(p.grad is not None) for p in params],
                                                       device=device)])
    torch.distributed.all_reduce(flat)
    present = flat[-len(params):]
    offset = 0
    for p, seen in zip(params, present.tolist(), strict=True):
        n = p.numel()
        if seen:
            p.grad = (flat[offset:offset + n] / world()[1]).view_as(p).to(p.dtype)
        offset += n


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean of each logged number over the ranks (what rank 0 logs)."""
    import torch

    if world()[1] == 1 or not values:
        return values
    keys = list(values)
    on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=on)
    torch.distributed.all_reduce(t)
    return {k: v / world()[1] for k, v in zip(keys, t.tolist(), strict=True)}


def check_in_sync(params: Iterable[nn.Parameter], what: str) -> None:
    """Raise if the ranks' copies of `params` have drifted apart: they must stay identical
    (the same start, the same averaged gradients, the same updates)."""
    import torch

    from evlm_cli.core.errors import TrainingError

    if world()[1] == 1:
        return
    on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.stack([p.detach().double().sum() for p in params]).to(on)
    low, high = total.clone(), total.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise TrainingError(f"{what}: the processes' parameters differ (largest gap "
                            f"{float((high - low).abs().max()):.3g}); they must stay identical")


def everywhere(flag: bool) -> bool:
    """Whether `flag` holds on every rank: a rank alone must not stop while the others wait
    in the next all-reduce."""
    import torch

    if world()[1] == 1:
        return flag
    on = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], device=on)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def barrier() -> None:
    import torch

    if world()[1] > 1:
        torch.distributed.barrier()


def shutdown() -> None:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
