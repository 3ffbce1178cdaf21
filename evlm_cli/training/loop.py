"""The one training loop: run setup, progress, AdamW schedule, clipping, NaN guard, log.csv, resume.

Stages hand it the modules to checkpoint, their optimisers, a loss function and batches.
Distillation and pruning are loss terms and extra optimisers, not loops of their own. Whoever
needs to watch or interrupt a run from outside (the fault and multi-process tests) passes
`Callback`s, or installs them for a whole stage with `callbacks_installed`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from evlm_cli.core.config import OptimConfig
from evlm_cli.core.errors import TrainingError
from evlm_cli.core.io import atomic_path
from evlm_cli.core.layout import WORK_ROOT
from evlm_cli.core.ranks import is_main, world
from evlm_cli.training import distributed
from evlm_cli.training.throughput import StepFlops, peak_matmul_flops

CHECKPOINT = "resume.pt"


class Batches(Protocol):
    """Deterministic batches per epoch; `start` skips the first batches (for resuming)."""

    def __len__(self) -> int: ...

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]: ...


@dataclass
class Optim:
    """One optimiser; only the first one of a run follows the warm-up/decay schedule and clipping."""

    optimizer: torch.optim.Optimizer
    after_step: Callable[[], None] | None = None  # e.g. clamp the gates' log_alpha


@dataclass
class Run:
    modules: dict[str, nn.Module]  # everything whose state a checkpoint must keep
    optims: list[Optim]
    loss: Callable[[dict[str, Tensor], int, int], tuple[Tensor, dict[str, float]]]
    batches: Batches
    optim_cfg: OptimConfig
    work_dir: Path  # undeclared resume folder
    log_path: Path | None = None
    desc: str = "train"
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast: bool = False  # bf16 autocast (`bf16_autocast`)
    # modules whose parameters ascend (the Lagrange multipliers): kept outside
    # DistributedDataParallel, their gradients averaged by an all-reduce of their own
    ascending: tuple[str, ...] = ()


class TrainStep(nn.Module):
    """One training step's forward as one module: every module the loss trains (student, L0
    gates, KD projections), so that DistributedDataParallel reduces all their gradients as the
    backward pass produces them, whatever path the loss reaches each by."""

    def __init__(self, modules: dict[str, nn.Module], loss):
        super().__init__()
        self.trained = nn.ModuleDict(modules)
        self.loss = loss

    def forward(self, batch: dict[str, Tensor], step: int, total: int):
        return self.loss(batch, step, total)


class Callback:
    """A hook into `fit`: `after_backward` is called at every step, `after_checkpoint` after
    each resume checkpoint; each does nothing unless a subclass overrides it. Callbacks run in
    every process of a multi-process run."""

    def after_backward(self, step: int, run: Run) -> None:
        """The gradients of step `step` (0 first) are in the parameters' `.grad`: averaged
        over the processes, not yet clipped or applied."""

    def after_checkpoint(self, step: int, run: Run) -> None:
        """The resume checkpoint after `step` steps is on disk, and every process is past it."""


# Callbacks that every `fit` in this process calls besides its own (`callbacks_installed`).
_installed: list[Callback] = []


@contextmanager
def callbacks_installed(*callbacks: Callback) -> Iterator[None]:
    """Have every `fit` in this process call `callbacks` while the block runs: how a program
    that runs a whole stage (`evlm_cli.pipeline.entry.run_stage`) hooks into its loop."""
    _installed.extend(callbacks)
    try:
        yield
    finally:
        for callback in callbacks:
            _installed.remove(callback)


def total_steps(optim_cfg: OptimConfig, steps_per_epoch: int) -> int:
    if optim_cfg.max_steps is not None:
        return optim_cfg.max_steps
    return max(1, math.ceil(optim_cfg.epochs * steps_per_epoch)) if optim_cfg.epochs > 0 else 0


def warmup_linear(warmup_steps: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total - step) / max(1, total - warmup_steps))
    return factor


def adamw(params, optim_cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings-like 1-D tensors."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": optim_cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=optim_cfg.lr if lr is None else lr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def deterministic() -> None:
    """Have torch pick its deterministic kernel wherever it has one.

    On the CPU the gradient of advanced indexing (`x[index]`, how ITM gathers its negatives)
    accumulates with atomic adds across threads, in whatever order the threads reach them, once
    a tensor is large enough to split: the same run gave other weights from the first step
    on. The deterministic kernel sorts the indices first. On CUDA cuBLAS needs a fixed
    workspace; a kernel with no deterministic version warns, naming itself, and still runs.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def setup(seed: int, threads: int | None, device: str) -> torch.device:
    """Seed, threads, determinism and device of a stage process: `auto` is CUDA when there
    is one.

    The one seeding site before a stage builds anything, so what it creates before training
    (the L0 gates' tie-breaking noise, KD projections) is the same on every run: the process
    starts from an entropy-seeded generator. `fit` reseeds for the loop itself.
    """
    deterministic()
    seed_everything(seed)
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # under torchrun: join the process group; on CUDA each rank takes its own GPU
    return distributed.init(torch.device(device))


def fingerprint(path: Path) -> str:
    """A hash of a file's or a directory's contents (a path alone may hold other results)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def work_dir(stage: str, *configs, inputs: tuple[Path, ...] = ()) -> Path:
    """A resume folder keyed by the stage's settings and the contents of its inputs."""
    key = [repr(configs), [fingerprint(p) for p in inputs]]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return WORK_ROOT / f"{stage}-{digest[:12]}"


def make_run(stage: str, split, optim_cfg: OptimConfig, seed: int, *,
             modules: dict[str, nn.Module], optims: list[Optim], loss, device: torch.device,
             log_path: Path, key: tuple = (), inputs: tuple[Path, ...] = (),
             augment: Callable | None = None, precision: str = "auto",
             ascending: tuple[str, ...] = ()) -> Run:
    """The training run of one stage over `split`, as every training stage sets it up.

    `key` (the stage's typed settings) and the contents of `inputs` name the resume folder;
    `augment` (`evlm_cli.data.augment.Augmenter`, built for the data by the stage) augments
    every training batch; `precision` (the spec's) says whether it trains in bf16 autocast;
    `ascending` names the modules trained by gradient ascent (see `Run`).
    """
    rank, size = world()
    if optim_cfg.batch_size % size:
        raise TrainingError(f"{stage}: batch_size {optim_cfg.batch_size} does not split evenly "
                            f"over {size} processes")
    # batch_size is the global batch: each rank takes its share of every one
    batches = EpochBatches(split, optim_cfg.batch_size // size, seed, rank=rank, world_size=size,
                           answer_balance=optim_cfg.answer_balance, augment=augment,
                           pin=device.type == "cuda")
    return Run(modules=modules, optims=optims, loss=loss, batches=batches, optim_cfg=optim_cfg,
               work_dir=work_dir(stage, seed, precision, *key, inputs=inputs), log_path=log_path,
               desc=stage, seed=seed, device=device, autocast=bf16_autocast(precision, device),
               ascending=ascending)


def bf16_autocast(precision: str, device: torch.device) -> bool:
    """Whether a stage trains in bf16 autocast: `auto` does on CUDA only."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


class _Log:
    """log.csv, one row per step; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path | None, resume_step: int):
        self.path, self.writer, self.file = path, None, None
        if path is None:
            return
        rows = []
        if resume_step and path.exists():
            with path.open() as f:
                # Rows up to the checkpoint, in order; a crash may have cut the last line short.
                for r in csv.DictReader(f):
                    if None in r.values() or not r["step"].isdigit():
                        break
                    if int(r["step"]) != len(rows) + 1 or int(r["step"]) > resume_step:
                        break
                    rows.append(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("w", newline="")
        self.rows_before = rows
        if rows:  # rewrite the kept rows now, so a failure before the next step loses nothing
            self.writer = csv.DictWriter(self.file, fieldnames=list(rows[0]), extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(rows)
            self.file.flush()

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        if self.writer is None:
            self.writer = csv.DictWriter(self.file, fieldnames=list(row), extrasaction="ignore")
            self.writer.writeheader()
            self.writer.writerows(self.rows_before)
        self.writer.writerow(row)

    def flush(self) -> None:
        if self.file:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file:
            self.file.close()


def fit(run: Run, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Train until the configured number of steps; resume from `work_dir` if a checkpoint is there.

    `callbacks`, then those installed with `callbacks_installed`, are called in that order.
    """
    callbacks = [*callbacks, *_installed]
    steps_per_epoch = len(run.batches)
    total = total_steps(run.optim_cfg, steps_per_epoch)
    main = run.optims[0].optimizer
    warmup = int(run.optim_cfg.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(main, warmup_linear(max(1, warmup), max(1, total)))
    run.work_dir.mkdir(parents=True, exist_ok=True)
    if total == 0:
        if run.log_path:
            empty_log(run.log_path)
        return {}
    ckpt_path = run.work_dir / CHECKPOINT
    step = 0
    seed_everything(run.seed)
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        for name, module in run.modules.items():
            module.load_state_dict(state["modules"][name])
        for o, s in zip(run.optims, state["optims"], strict=True):
            o.optimizer.load_state_dict(s)
        schedule.load_state_dict(state["schedule"])
        step = state["step"]
        torch.set_rng_state(state["rng"])  # batches are seeded per epoch; this covers dropout/gates
        tqdm.write(f"{run.desc}: resuming from step {step} of {total} ({ckpt_path})")
    # The log grows in the work folder (DVC deletes declared outputs before a rerun, which
    # would lose the steps before a resume) and is copied out whole at the end.
    main_rank = is_main()
    log = _Log(run.work_dir / "log.csv" if run.log_path and main_rank else None, step)
    for m in run.modules.values():
        m.train()
    clip = run.optim_cfg.grad_clip
    clip_params = [p for g in main.param_groups for p in g["params"]]
    every_param = [p for o in run.optims for g in o.optimizer.param_groups for p in g["params"]]
    trained = TrainStep({k: m for k, m in run.modules.items() if k not in run.ascending},
                        run.loss)
    inside = {id(p) for p in trained.parameters()}
    outside = [p for p in every_param if id(p) not in inside]
    # several processes: DistributedDataParallel over everything that descends
    forward = distributed.data_parallel(trained, run.device)
    every = run.optim_cfg.checkpoint_every
    last = {}
    flops, peak = StepFlops(), peak_matmul_flops(run.device, run.autocast)
    bar = tqdm(total=total, initial=step, desc=run.desc, unit="step", dynamic_ncols=True,
               disable=not main_rank)
    try:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            waited_from = time.perf_counter()
            for batch in run.batches(epoch, start):
                t0 = time.perf_counter()
                wait = t0 - waited_from  # the step stood still for its batch this long
                # batches come pinned on CUDA: the copy overlaps the previous step's work
                batch = {k: v.to(run.device, non_blocking=True) for k, v in batch.items()}
                with flops.watch():
                    with torch.autocast(run.device.type, dtype=torch.bfloat16,
                                        enabled=run.autocast):
                        loss, logs = forward(batch, step, total)
                    if not distributed.everywhere(bool(torch.isfinite(loss))):
                        raise TrainingError(
                            f"{run.desc}: the loss became {loss.item()} at step {step} "
                            f"({', '.join(f'{k}={v:.4g}' for k, v in logs.items())}); "
                            "nothing was saved. Lower the learning rate or check the data")
                    for o in run.optims:
                        o.optimizer.zero_grad(set_to_none=True)
                    loss.backward()  # under DDP: its gradients averaged over the processes
                flops.done()
                distributed.average_gradients(outside)  # the multipliers: N processes as one
                for callback in callbacks:
                    callback.after_backward(step, run)
                grad_norm = (torch.nn.utils.clip_grad_norm_(clip_params, clip).item()
                             if clip else float("nan"))
                for o in run.optims:
                    o.optimizer.step()
                    if o.after_step:
                        o.after_step()
                schedule.step()
                step += 1
                dt = time.perf_counter() - t0
                n = next(iter(batch.values())).shape[0] * world()[1]
                # data_wait: the share of the step spent waiting for its batch (0 = fed);
                # peak_share: this process's arithmetic rate over its device's matmul peak
                rate = (flops.per_step or 0) / (dt + wait)
                last = {"step": step, "epoch": round(step / steps_per_epoch, 4),
                        **distributed.mean_over_ranks({"loss": loss.item(), **logs}),
                        "lr": main.param_groups[0]["lr"], "grad_norm": grad_norm,
                        "examples_per_s": n / (dt + wait), "data_wait": wait / (dt + wait),
                        "gflop_per_s": rate / 1e9, "peak_share": rate / peak}
                log.write(last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_s']:.0f}")
                bar.update(1)
                if step % every == 0 and step < total:
                    log.flush()  # the rows a resume keeps are on disk before the checkpoint
                    distributed.check_in_sync(every_param, run.desc)
                    if main_rank:
                        _save(ckpt_path, run, schedule, step)
                    distributed.barrier()  # no rank runs ahead of a checkpoint half-written
                    for callback in callbacks:
                        callback.after_checkpoint(step, run)
                if step >= total:
                    break
                waited_from = time.perf_counter()
    finally:
        bar.close()
        log.close()
    distributed.check_in_sync(every_param, run.desc)  # gates and multipliers included
    for m in run.modules.values():
        m.eval()
    if run.log_path and main_rank:
        with atomic_path(run.log_path) as tmp:
            shutil.copyfile(run.work_dir / "log.csv", tmp)
    return last


def _save(path: Path, run: Run, schedule, step: int) -> None:
    state = {"modules": {k: m.state_dict() for k, m in run.modules.items()},
             "optims": [o.optimizer.state_dict() for o in run.optims],
             "schedule": schedule.state_dict(), "step": step, "rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def empty_log(path: Path) -> None:
    """The log of a stage that trained nothing (imported, disabled): a header only."""
    with atomic_path(path) as tmp:
        tmp.write_text("step,loss\n")


def finish(run: Run) -> None:
    """Drop the resume checkpoint once the final outputs are safely written."""
    distributed.barrier()  # every rank is past its last read of the checkpoint
    if is_main():
        (run.work_dir / CHECKPOINT).unlink(missing_ok=True)


class EpochBatches:
    """Shuffled full batches of a prepared split per epoch, padding trimmed to the longest text.

    With `answer_balance` > 0 an epoch samples examples by answer frequency instead of
    shuffling (see `PreparedSplit.answer_weights`). Which examples a batch holds, and how
    `augment` changes them, depend on (seed, epoch, rank, batch) alone: the split's data
    workers build them ahead of the step, and a resumed epoch starts at its batch.
    """

    def __init__(self, split, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 answer_balance: float = 0.0, augment: Callable | None = None,
                 pin: bool = False):
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.augment, self.pin = augment, pin
        self.weights = split.answer_weights(answer_balance) if answer_balance > 0 else None
        self.count = split.num_batches(batch_size, world_size, drop_last=True)
        if self.count < 1:
            raise TrainingError(f"split {split.name!r} has {len(split)} examples, fewer than one "
                                f"batch of {batch_size}: lower the batch size or use more examples")

    def __len__(self) -> int:
        return self.count

    def __call__(self, epoch: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
        order = self.split.shard_indices(True, self.seed, epoch, self.rank, self.world_size,
                                         self.weights)
        augmented = self.augment is not None
        keys = [(order[b * self.batch_size:(b + 1) * self.batch_size],
                 (self.seed, epoch, self.rank, b) if augmented else None)
                for b in range(start, self.count)]
        for batch in self.split.stream(keys, self.augment, self.pin):
            yield trim_text(batch)


def trim_text(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop padding columns that no example in the batch uses (easy-VQA questions are short)."""
    length = int(batch["attention_mask"].sum(1).max())
    return {**batch, "input_ids": batch["input_ids"][:, :length],
            "attention_mask": batch["attention_mask"][:, :length]}
