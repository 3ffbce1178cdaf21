"""The command a training stage replaces itself with to run in several processes or on several
nodes: torchrun alone, or srun starting one torchrun per node of a Slurm allocation."""

import sys

import pytest

from evlm_cli.core.errors import EvlmError
from evlm_cli.training.distributed import first_host, launch_command, rendezvous_of

ARGV = ["--params", "runs/a/params.yaml", "--log", "runs/a/prune/log.csv"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
SLURM = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[07-08]"}


def test_one_node_runs_torchrun_standalone():
    assert launch_command("prune", ARGV, 2) == [
        *TORCHRUN, "--standalone", "--nproc-per-node=2", "-m", "evlm_cli", "--", "stage",
        "prune", *ARGV]


def test_several_nodes_meet_at_the_rendezvous_under_an_id_every_node_computes_alike():
    command = launch_command("prune", ARGV, 4, nodes=2, rendezvous="10.0.0.1:29400", env={})
    assert command[:len(TORCHRUN) + 3] == [*TORCHRUN, "--nnodes=2", "--rdzv-backend=c10d",
                                          "--rdzv-endpoint=10.0.0.1:29400"]
    run_id = next(a for a in command if a.startswith("--rdzv-id="))
    assert run_id == next(a for a in launch_command("prune", ARGV, 4, nodes=2,
                                                     rendezvous="10.0.0.1:29400", env={})
                          if a.startswith("--rdzv-id="))
    other = launch_command("finetune", ARGV, 4, nodes=2, rendezvous="10.0.0.1:29400", env={})
    assert run_id not in other
    assert "--nproc-per-node=4" in command and command[-len(ARGV):] == ARGV


@pytest.mark.parametrize("env, found", [
    ({"EVLM_RENDEZVOUS": "head:1234"}, "head:1234"),
    ({"MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "5000"}, "10.1.1.1:5000"),
    ({"EVLM_RENDEZVOUS": "head:1234", "MASTER_ADDR": "10.1.1.1"}, "head:1234"),
])
def test_the_rendezvous_comes_from_the_spec_else_the_environment(env, found):
    assert rendezvous_of(None, env) == found
    assert rendezvous_of("spec:1", env) == "spec:1"


def test_several_nodes_without_a_rendezvous_is_one_line_naming_the_keys():
    with pytest.raises(EvlmError, match=r"resources.rendezvous .* EVLM_RENDEZVOUS"):
        launch_command("prune", ARGV, 1, nodes=2, env={})


def test_slurm_starts_one_torchrun_per_node_meeting_on_the_first_node():
    command = launch_command("prune", ARGV, 8, nodes=2, launcher="slurm", env=SLURM)
    assert command[:4] == ["srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert command[4:4 + len(TORCHRUN)] == TORCHRUN
    assert "--rdzv-endpoint=gpu07:29400" in command and "--nnodes=2" in command
    assert "--nproc-per-node=8" in command
    # the spec's rendezvous wins over the job's first node
    named = launch_command("prune", ARGV, 8, nodes=2, rendezvous="ib0:7000", launcher="slurm",
                           env=SLURM)
    assert "--rdzv-endpoint=ib0:7000" in named


def test_slurm_outside_an_allocation_says_how_to_run_inside_one():
    with pytest.raises(EvlmError, match="not inside a Slurm allocation"):
        launch_command("prune", ARGV, 8, nodes=2, launcher="slurm", env={})


def test_one_node_under_slurm_needs_no_srun():
    assert launch_command("prune", ARGV, 2, nodes=1, launcher="slurm", env=SLURM)[0] == \
        sys.executable


@pytest.mark.parametrize("nodelist, first", [("node07", "node07"), ("a,b", "a"),
                                             ("gpu[07-09,12]", "gpu07"), ("gpu[1-2],cpu3", "gpu1"),
                                             ("cpu3,gpu[1-2]", "cpu3"), ("n[5]", "n5")])
def test_the_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_host(nodelist) == first
