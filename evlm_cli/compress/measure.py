"""Cost of a model: parameters, FLOPs, and latency measured side by side in one process."""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psutil
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: nn.Module) -> int:
    """Number of parameters (each shared tensor once)."""
    return sum(p.numel() for p in module.parameters())


def count_flops(model: Callable[..., Any], *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of one forward call, counted by torch's FlopCounterMode (a multiply-add is 2)."""
    counter = FlopCounterMode(display=False)
    # The math attention kernel: torch has no FLOP formula for the fused CPU kernel, which
    # would count attention's two matmuls as zero.
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]), counter:
        model(*inputs, **kwargs)
    return int(counter.get_total_flops())


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _synchronize() -> None:
    # Kernels run asynchronously on a GPU: without this a call would time its launch only.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# How many of its threads' cores a timing may find taken by other processes before it is
# marked contended: a core's quarter is what system daemons and the idle DVC parent use.
SPARE_CORE_SHARE = 0.25
# How long the machine is watched before timing starts.
QUIET_WINDOW_S = 1.0


@dataclass
class Load:
    """The cores other processes kept busy, measured over one window of wall time: the
    machine's busy CPU time, less this process's own (its threads, ONNX Runtime's included),
    over the window's length."""

    others_busy_cores: float = 0.0
    seconds: float = 0.0


def _busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds this process has used)."""
    machine = psutil.cpu_times()
    busy = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    own = psutil.Process().cpu_times()
    return busy, own.user + own.system


@contextmanager
def watched_load() -> Iterator[Load]:
    """Measure what other processes took of the machine while the block ran: the yielded
    `Load` is filled in when the block ends."""
    load = Load()
    busy, own = _busy_seconds()
    start = time.perf_counter()
    try:
        yield load
    finally:
        busy_after, own_after = _busy_seconds()
        load.seconds = time.perf_counter() - start
        others = (busy_after - busy) - (own_after - own)
        load.others_busy_cores = max(0.0, others / load.seconds) if load.seconds > 0 else 0.0


def load_before(window_s: float = QUIET_WINDOW_S) -> Load:
    """The cores other processes keep busy now, watched for `window_s` while this one sleeps."""
    with watched_load() as load:
        time.sleep(window_s)
    return load


def machine_cores() -> int:
    """The logical CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def contended(others_busy_cores: float, threads: int, cores: int) -> bool:
    """Whether other processes left fewer free cores than a timing on `threads` threads needs."""
    return cores - others_busy_cores < min(threads, cores) - SPARE_CORE_SHARE


def measure_latency(models: dict[str, Callable[[], Any]], *, repeats: int = 30, warmup: int = 5,
                    threads: int | None = 1, shuffle: bool = True, seed: int = 0,
                    device: torch.device | None = None, bf16: bool = False
                    ) -> dict[str, dict]:
    """Time each zero-argument callable, interleaved, and report milliseconds per call.

    Rounds interleave the models (round r times every model once), so drift in clock speed,
    thermal state or other load hits all of them alike; with `shuffle` each round's order is
    a fixed-seed permutation, so no model always runs right after another. `threads` sets
    torch's intra-op threads for the measurement (None leaves it) and is restored afterwards.
    On a CUDA `device` each call is timed by CUDA events around it, after the device has
    finished what came before: the GPU's time, not the launch's. `bf16` runs the calls under
    bf16 autocast on `device`.
    Returns {name: {"median_ms", "p90_ms", "mean_ms", "times_ms"}}.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    device = device or torch.device("cpu")
    on_gpu = device.type == "cuda"
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    order = list(models)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in order}
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=bf16):
            for name in order:
                for _ in range(warmup):
                    models[name]()
            _synchronize()
            for _ in range(repeats):
                if shuffle:
                    rng.shuffle(order)
                for name in order:
                    times[name].append(_time_one(models[name], on_gpu))
    finally:
        torch.set_num_threads(previous_threads)
    return {name: {"median_ms": statistics.median(ms), "p90_ms": _percentile(ms, 90),
                   "mean_ms": statistics.fmean(ms), "times_ms": ms}
            for name, ms in times.items()}


def _time_one(call: Callable[[], Any], on_gpu: bool) -> float:
    """Milliseconds of one call: CUDA events on a GPU, the wall clock otherwise."""
    if on_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    call()
    _synchronize()
    return (time.perf_counter() - start_s) * 1000.0


def speedup(baseline: dict, candidate: dict) -> float:
    """How many times faster the candidate is: ratio of median latencies."""
    return baseline["median_ms"] / candidate["median_ms"]
