"""Two processes under torchrun train as one process on the same global batch.

A tiny prune stage (the one with L0 gates and Lagrange multipliers) runs with
`resources.processes` 1 and 2 on CPU (gloo). The first step's gradients, gates' and
multipliers' included, must agree, and so must the trained models; the 2-process run writes its
outputs once; and a 2-process run killed after a checkpoint resumes and ends bit-identical to an
uninterrupted one. The gradients are written, and the kill made, by callbacks the test installs
in the stage's training loop (`tests.helpers.hooked_stage`, started under torchrun).
Pre-training's ITC, whose negatives are the other processes' examples too, is checked on its
own: 2 gloo processes against 1 on the same global batch.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from evlm_cli.pipeline.entry import run_stage
from evlm_cli.spec.load import load_spec
from tests.helpers import hooked_stage
from tests.helpers.prepared_project import prepared_project
from tests.helpers.project import TINY

pytestmark = pytest.mark.e2e

STEPS, EVERY, BATCH = 4, 2, 16
# Float sums run in another order when a batch is split in two (and the two halves' text is
# trimmed to different lengths): the gradients agree to rounding, not bit for bit. The largest
# gap measured, 1.8e-6, is in the query and key weights, whose gradients come through the
# attention maps' softmax; averaging the KD terms per process instead of over the whole batch
# made gaps of 1e-4.
ATOL, RTOL = 5e-6, 1e-4
# The same rounding carried through STEPS AdamW steps: 2.1e-5 at most, measured, in a query
# weight whose gradient is near zero (Adam divides by its running size). A step that differs
# moves a weight by about the learning rate (1e-4): twice the bound.
MODEL_ATOL, MODEL_RTOL = 5e-5, 0.0


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Prepared data, a task teacher and a distilled student: what prune reads."""
    spec = load_spec(TINY)
    for section in ("pretrain", "task_teacher", "distill"):
        spec[section]["train"].update(max_steps=2, batch_size=BATCH)
    spec["prune"]["train"].update(max_steps=STEPS, checkpoint_every=EVERY, batch_size=BATCH)
    # Every term on: the two halves of a batch hold different numbers of text tokens, and the
    # hidden-state and attention KD terms still average over the whole batch's.
    assert all(spec["prune"]["weights"].values())
    params = {f"params{n}.yaml": {**spec, "resources": {**spec["resources"], "processes": n}}
              for n in (1, 2)}
    # two processes, each with two data workers over its own shard
    params["params2w.yaml"] = {**spec, "resources": {**spec["resources"], "processes": 2,
                                                     "data_workers": 2}}
    with prepared_project(tmp_path_factory.mktemp("ddp"), params) as root:
        p = ["--params", "params1.yaml"]
        assert run_stage("teacher_pretrain", [*p, "--pairs", "pairs", "--model", "pre",
                                              "--log", "pre.csv"]) == 0
        assert run_stage("distill", [*p, "--pairs", "pairs", "--teacher", "pre",
                                     "--model", "student", "--log", "distill.csv"]) == 0
        assert run_stage("teacher", [*p, "--prepared", "data", "--pretrained", "pre",
                                     "--model", "teacher", "--log", "teacher.csv"]) == 0
        yield root


def prune_arguments(params: int | str, out: str) -> list[str]:
    return ["--params", f"params{params}.yaml", "--prepared", "data", "--student", "student",
            "--teacher", "teacher", "--model", f"{out}/model", "--masks", f"{out}/masks.json",
            "--log", f"{out}/log.csv"]


def prune(root: Path, processes: int | str, out: str) -> subprocess.CompletedProcess:
    """The prune stage as DVC runs it; with 2 processes it relaunches itself under torchrun."""
    return subprocess.run([sys.executable, "-m", "evlm_cli", "stage", "prune",
                           *prune_arguments(processes, out)], cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)


def hooked_prune(root: Path, processes: int, out: str, **hooks) -> subprocess.CompletedProcess:
    """The prune stage with `hooked_stage`'s callbacks in every process's loop; with 2
    processes under torchrun, started here as the stage's relaunch would start it."""
    command = hooked_stage.command("prune", prune_arguments(processes, out),
                                   processes=processes, **hooks)
    return subprocess.run(command, cwd=root, env=hooked_stage.environment(),
                          capture_output=True, text=True, timeout=600)


def kept_units(masks: Path) -> dict:
    """The model's shape after slicing and each layer's kept units, from masks.json."""
    summary = json.loads(masks.read_text())
    kept = {(encoder, layer["layer"], unit): value["kept_indices"]
            for encoder, part in summary["encoders"].items() for layer in part["layers"]
            for unit, value in layer.items() if isinstance(value, dict)}
    assert kept
    return {"shape": summary["shape"], "kept_params": summary["kept_params"], **kept}


def test_two_processes_train_as_one_and_resume(project):
    one = hooked_prune(project, 1, "one", dump_grads=project / "grads1.safetensors")
    assert one.returncode == 0, one.stderr[-3000:]
    two = hooked_prune(project, 2, "two", dump_grads=project / "grads2.safetensors")
    assert two.returncode == 0, two.stderr[-3000:]

    # the first step's gradients: every parameter, the gates and multipliers among them
    g1, g2 = load_file(project / "grads1.safetensors"), load_file(project / "grads2.safetensors")
    assert g1.keys() == g2.keys()
    assert any("log_alpha" in k for k in g1) and any("lambda" in k for k in g1), sorted(g1)[:20]
    far = {k: float((g1[k] - g2[k]).abs().max()) for k in g1
           if not (g1[k] - g2[k]).abs().le(ATOL + RTOL * g1[k].abs()).all()}
    assert not far, f"gradients differ beyond atol {ATOL}, rtol {RTOL}: {far}"

    # written once, by rank 0: one log row per step, one summary line, no stray temp files
    with (project / "two/log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, STEPS + 1))
    assert two.stdout.count("stage prune done") == 1
    assert not [p for p in (project / "two").rglob(".*.tmp")]
    m1, m2 = (load_file(project / f"{r}/model/model.safetensors") for r in ("one", "two"))
    assert m1.keys() == m2.keys()
    for key in m1:  # the trained models, every tensor: equal to rounding
        torch.testing.assert_close(m2[key], m1[key], atol=MODEL_ATOL, rtol=MODEL_RTOL,
                                   msg=lambda text, key=key: f"{key}: {text}")
    assert kept_units(project / "one/masks.json") == kept_units(project / "two/masks.json")

    # killed (SIGKILL) right after the step-2 checkpoint: torchrun fails, nothing looks done
    killed = hooked_prune(project, 2, "resumed", kill_after=EVERY)
    assert killed.returncode != 0
    assert not (project / "resumed/model").exists() and not (project / "resumed/log.csv").exists()
    again = prune(project, 2, "resumed")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {EVERY} of {STEPS}" in again.stdout + again.stderr
    resumed = load_file(project / "resumed/model/model.safetensors")
    differing = [k for k in m2 if not (m2[k] == resumed[k]).all()]
    assert not differing, f"the resumed 2-process run differs from the uninterrupted one: {differing}"
    assert (project / "two/masks.json").read_text() == (project / "resumed/masks.json").read_text()

    # data workers under torchrun: each rank's workers build its own shard's batches, and
    # the run ends bit-identical to the one without workers
    workers = prune(project, "2w", "workers")
    assert workers.returncode == 0, workers.stderr[-3000:]
    m2w = load_file(project / "workers/model/model.safetensors")
    assert not [k for k in m2 if not (m2[k] == m2w[k]).all()]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_as_one_node_of_two(project):
    """Two torchrun agents on this machine, one process each, meeting at a c10d rendezvous on
    127.0.0.1, each running the same stage command (as every node of a job does): the same
    weights as one node of two processes, to the bit; rank 0 alone writes."""
    if not (project / "two/model").exists():  # the test above makes it; run alone, make it here
        assert prune(project, 2, "two").returncode == 0
    spec = yaml.safe_load((project / "params2.yaml").read_text())
    spec["resources"].update(processes=1, nodes=2, rendezvous=f"127.0.0.1:{free_port()}")
    (project / "params_nodes.yaml").write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "evlm_cli", "stage", "prune",
               *prune_arguments("_nodes", "nodes")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = [subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert sum(out.count("stage prune done") for out in outputs) == 1
    two, nodes = (load_file(project / f"{r}/model/model.safetensors") for r in ("two", "nodes"))
    assert two.keys() == nodes.keys()
    assert not [k for k in two if not torch.equal(two[k], nodes[k])]
    assert (project / "two/masks.json").read_text() == (project / "nodes/masks.json").read_text()


def idle_slurm_nodes() -> int:
    """Idle nodes of a Slurm cluster that answers here; 0 without one."""
    if not (shutil.which("sinfo") and shutil.which("salloc")):
        return 0
    try:
        out = subprocess.run(["sinfo", "-h", "-t", "idle", "-o", "%D"], capture_output=True,
                             text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return 0
    return sum(int(n) for n in out.stdout.split() if n.isdigit()) if out.returncode == 0 else 0


@pytest.mark.skipif(idle_slurm_nodes() < 2,
                    reason="needs a Slurm cluster with 2 idle nodes (one host can run two "
                           "slurmd: docs/torchrun.md)")
def test_slurm_runs_one_torchrun_per_node_and_trains_as_one_node_of_two(project):
    """The stage inside a 2-node allocation, as `evlm run` in a job script runs it, with
    `resources.launcher: slurm`: it relaunches itself as srun starting one torchrun agent per
    node, meeting at port 29400 of the allocation's first node. The agents wait for each other
    at the rendezvous, so the stage finishes only if srun started both. The weights are one
    node of two processes', to the bit."""
    if not (project / "two/model").exists():
        assert prune(project, 2, "two").returncode == 0
    spec = yaml.safe_load((project / "params2.yaml").read_text())
    spec["resources"].update(processes=1, nodes=2, launcher="slurm")
    (project / "params_slurm.yaml").write_text(yaml.safe_dump(spec))
    command = ["salloc", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "evlm_cli",
               "stage", "prune", *prune_arguments("_slurm", "slurm")]
    done = subprocess.run(command, cwd=project, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("stage prune done") == 1
    two, slurm = (load_file(project / f"{r}/model/model.safetensors") for r in ("two", "slurm"))
    assert not [k for k in two if not torch.equal(two[k], slurm[k])]
    assert (project / "two/masks.json").read_text() == (project / "slurm/masks.json").read_text()


# Each training kind's inputs in the module's project, and its outputs.
KIND_ARGUMENTS = {
    "teacher_pretrain": ["--pairs", "pairs", "--model", "{out}/model"],
    "distill": ["--pairs", "pairs", "--teacher", "pre", "--model", "{out}/model"],
    "teacher": ["--prepared", "data", "--pretrained", "pre", "--model", "{out}/model"],
    # finetune's loss is dense's on a pruned student (prune is the test above)
    "dense": ["--prepared", "data", "--student", "student", "--teacher", "teacher",
              "--model", "{out}/model"],
}


@pytest.mark.parametrize("kind", KIND_ARGUMENTS)
def test_every_training_kind_trains_under_ddp_with_every_parameter_used(project, kind):
    """DistributedDataParallel without `find_unused_parameters` fails at the second step if
    some trained parameter got no gradient in the first: every kind's loss reaches all of
    them. Distill and dense distil hidden states, so their KD projections train under it too."""
    spec = yaml.safe_load((project / "params2.yaml").read_text())
    for section in ("pretrain", "task_teacher", "distill", "finetune"):
        spec[section]["train"].update(max_steps=3, checkpoint_every=100, batch_size=BATCH)
    assert spec["distill"]["weights"]["hidden"] and spec["dense"]["weights"]["hidden"]
    (project / "params2_kinds.yaml").write_text(yaml.safe_dump(spec))
    out = f"kind-{kind}"
    args = [a.format(out=out) for a in KIND_ARGUMENTS[kind]]
    done = subprocess.run([sys.executable, "-m", "evlm_cli", "stage", kind, "--params",
                           "params2_kinds.yaml", *args, "--log", f"{out}/log.csv"], cwd=project,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with (project / out / "log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]


def test_ctrl_c_stops_every_worker(project):
    """Ctrl-C (SIGINT to the process group, as a terminal or evlm's runner sends it) stops
    torchrun and both workers: nothing is left running."""
    spec = yaml.safe_load((project / "params2.yaml").read_text())
    spec["prune"]["train"].update(max_steps=100_000, checkpoint_every=100_000)
    (project / "params_long.yaml").write_text(yaml.safe_dump(spec))
    args = ["--params", "params_long.yaml", "--prepared", "data", "--student", "student",
            "--teacher", "teacher", "--model", "long/model", "--masks", "long/masks.json",
            "--log", "long/log.csv"]
    proc = subprocess.Popen([sys.executable, "-m", "evlm_cli", "stage", "prune", *args],
                            cwd=project, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        family: list[psutil.Process] = []
        while time.monotonic() < deadline:  # torchrun and its two workers
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            if len(family) >= 3:
                break
            time.sleep(0.5)
        assert len(family) >= 3, [p.cmdline()[:6] for p in family]
        time.sleep(2)  # let the workers get into training
        os.killpg(proc.pid, signal.SIGINT)
        gone, alive = psutil.wait_procs(family, timeout=60)
        assert not alive, [p.cmdline()[:6] for p in alive]
        assert not (project / "long/model").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _sync_check_worker(rank: int, store_file: str, results) -> None:
    import torch

    from evlm_cli.core.errors import TrainingError
    from evlm_cli.training import distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.FileStore(store_file, 2), rank=rank, world_size=2)
    try:
        for drift in (0.0, 1e-6):  # identical copies, then rank 1's drifted by a hair
            params = [torch.nn.Parameter(torch.ones(3) + (drift if rank == 1 else 0.0))]
            try:
                distributed.check_in_sync(params, "prune")
                results.put((rank, drift, "in sync"))
            except TrainingError as error:
                results.put((rank, drift, str(error)))
    finally:
        torch.distributed.destroy_process_group()


def test_drifted_ranks_are_caught(tmp_path):
    """The guard run at every checkpoint: ranks whose parameters differ at all stop training."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_sync_check_worker,
                               args=(rank, str(tmp_path / "store"), results))
               for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    said = {(rank, drift): text for rank, drift, text in (results.get(timeout=5)
                                                          for _ in range(4))}
    assert said[0, 0.0] == said[1, 0.0] == "in sync"
    for rank in (0, 1):
        assert said[rank, 1e-6].startswith("prune: the processes' parameters differ"), said


# Four pairs showing three images; rows 1 and 2 show one image, and each process holds one of
# them, so the gathered image ids must make them positives of each other.
PAIR_IMAGES = [0, 1, 1, 2]


def _tiny_pretrain_model():
    from evlm_cli.models.config import make_config
    from evlm_cli.models.vlm import VLM

    torch.manual_seed(0)
    width = dict(layers=1, width=16, heads=2, ffn=32)
    cfg = make_config(vision=width, text=width, fusion=width, image_size=16, patch_size=8,
                      vocab_size=30, max_positions=8, heads=["itc", "itm", "mlm"], embed_dim=8)
    return VLM(cfg).eval()


def _global_pairs() -> dict:
    g = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, 16, 16, generator=g)
    ids = torch.randint(5, 30, (4, 6), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    return {"images": images[PAIR_IMAGES], "input_ids": ids,
            "attention_mask": torch.ones(4, 6, dtype=torch.long),
            "image_index": torch.tensor(PAIR_IMAGES)}


def _itc_worker(rank: int, world_size: int, store_file: str, out: str) -> None:
    """This process's share of the global batch through the pre-training objective (ITC only),
    backward and the loop's gradient average; the loss and gradients written to `out`, with
    ITC's negatives gathered over the processes and, for contrast, local."""
    from evlm_cli.compress.objective import TASK_ONLY, NegativeRule, Objective
    from evlm_cli.training import distributed

    if world_size > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
        torch.distributed.init_process_group(
            "gloo", store=torch.distributed.FileStore(store_file, world_size), rank=rank,
            world_size=world_size)
    try:
        share = len(PAIR_IMAGES) // world_size
        batch = {k: v[rank * share:(rank + 1) * share] for k, v in _global_pairs().items()}
        results = {}
        for negatives in ("global", "local"):
            model = _tiny_pretrain_model()
            rule = NegativeRule(across_processes=negatives == "global")
            objective = Objective(model, "pretrain", TASK_ONLY, 1.0, negative_rule=rule,
                                  task_weights={"itc": 1.0, "itm": 0.0, "mlm": 0.0})
            loss, _ = objective(batch, 0, 1)
            loss.backward()
            distributed.average_gradients(model.parameters())
            results[f"{negatives}/loss"] = loss.detach()
            results.update({f"{negatives}/{name}": p.grad for name, p in model.named_parameters()
                            if p.grad is not None})
        torch.save(results, out)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def test_itc_over_two_processes_is_one_process_itc(tmp_path):
    """Gathered negatives: each of 2 processes computes the 1-process ITC loss on the global
    batch, and the averaged gradients are the 1-process ones, every parameter's (encoders,
    projections, temperature). Each process's own negatives give another loss."""
    import torch.multiprocessing as mp

    _itc_worker(0, 1, "", str(tmp_path / "one.pt"))
    context = mp.get_context("spawn")
    workers = [context.Process(target=_itc_worker,
                               args=(rank, 2, str(tmp_path / "store"), str(tmp_path / f"{rank}.pt")))
               for rank in (0, 1)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    one = torch.load(tmp_path / "one.pt")
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in (0, 1)]
    grads = [k for k in one if k.startswith("global/") and k != "global/loss"]
    assert any("itc.temp" in k for k in grads) and any("vision" in k for k in grads), grads
    for two in ranks:
        assert two.keys() == one.keys()
        for key in ["global/loss", *grads]:
            torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-5,
                                       msg=lambda text, key=key: f"{key}: {text}")
    # each process's own 2 x 2 block alone: not the global batch's loss
    assert abs(ranks[0]["local/loss"] - one["local/loss"]) > 1e-3
    assert torch.equal(one["local/loss"], one["global/loss"])  # one process: the same
