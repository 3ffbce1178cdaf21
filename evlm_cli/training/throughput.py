"""How close a training stage runs to the machine's limit: the arithmetic of one step, counted,
against the rate the machine multiplies matrices at, measured.

A stage's examples per second say little across models and machines. Its arithmetic rate
(FLOPs of a step over its time) as a share of what one large matmul reaches on the same
threads and device says how much a faster kernel, a larger batch or bf16 could still give.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

# A square matmul this size keeps every core's vector units busy on a laptop or a GPU; its
# best of a few runs, after a few that wake the cores and the BLAS up, is the machine's rate.
PEAK_SIZE, PEAK_WARMUP, PEAK_REPEATS = 1024, 3, 10


def peak_matmul_flops(device: torch.device, bf16: bool) -> float:
    """FLOPs per second of the fastest of a few square matmuls on `device`, in bf16 or fp32,
    with the threads torch has now."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    generator = torch.Generator(device="cpu").manual_seed(0)  # the global one is the run's
    a, b = (torch.randn(PEAK_SIZE, PEAK_SIZE, generator=generator).to(device, dtype)
            for _ in range(2))
    best = float("inf")
    with torch.no_grad():
        for _ in range(PEAK_WARMUP):
            torch.mm(a, b)
        for _ in range(PEAK_REPEATS):
            _synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
    return 2 * PEAK_SIZE ** 3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepFlops:
    """Counts the FLOPs of the first step it watches (forward and backward, every model the
    loss runs: a distilling teacher included), then watches no more.

    torch counts matmuls and convolutions; the fused attention kernel has no formula, so
    attention's two products are left out, a few percent at the demo's text lengths: the
    count is a lower bound.
    """

    def __init__(self) -> None:
        self.per_step: int | None = None
        self._counter: FlopCounterMode | None = None

    def watch(self) -> AbstractContextManager:
        if self.per_step is not None:
            return nullcontext()
        self._counter = FlopCounterMode(display=False)
        return self._counter

    def done(self) -> None:
        if self._counter is not None and self.per_step is None:
            self.per_step = int(self._counter.get_total_flops())
            self._counter = None
