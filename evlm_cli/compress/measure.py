"""Cost of a model: parameters, FLOPs, and latency measured side by side in one process."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

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


def measure_latency(models: dict[str, Callable[[], Any]], *, repeats: int = 30, warmup: int = 5,
                    threads: int | None = 1, shuffle: bool = True, seed: int = 0
                    ) -> dict[str, dict]:
    """Time each zero-argument callable, interleaved, and report milliseconds per call.

    Rounds interleave the models (round r times every model once), so drift in clock speed,
    thermal state or other load hits all of them alike; with `shuffle` each round's order is
    a fixed-seed permutation, so no model always runs right after another. `threads` sets
    torch's intra-op threads for the measurement (None leaves it) and is restored afterwards.
    Returns {name: {"median_ms", "p90_ms", "mean_ms", "times_ms"}}.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    order = list(models)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in order}
    try:
        with torch.inference_mode():
            for name in order:
                for _ in range(warmup):
                    models[name]()
            _synchronize()
            for _ in range(repeats):
                if shuffle:
                    rng.shuffle(order)
                for name in order:
                    start = time.perf_counter()
                    models[name]()
                    _synchronize()
                    times[name].append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
    return {name: {"median_ms": statistics.median(ms), "p90_ms": _percentile(ms, 90),
                   "mean_ms": statistics.fmean(ms), "times_ms": ms}
            for name, ms in times.items()}


def speedup(baseline: dict, candidate: dict) -> float:
    """How many times faster the candidate is: ratio of median latencies."""
    return baseline["median_ms"] / candidate["median_ms"]
