"""FLOPs, parameter counts and interleaved latency measurement."""

import time

import torch
from torch import nn

from evlm_cli.compress.measure import (
    contended,
    count_flops,
    count_params,
    measure_latency,
    speedup,
    watched_load,
)


def test_count_flops_of_linear():
    assert count_flops(nn.Linear(8, 16), torch.randn(4, 8)) == 2 * 4 * 8 * 16


def test_count_flops_passes_keyword_arguments():
    def scaled(x, *, times):
        return x @ torch.ones(8, times)

    assert count_flops(scaled, torch.randn(4, 8), times=3) == 2 * 4 * 8 * 3


def test_count_params_counts_shared_weights_once():
    linear = nn.Linear(8, 16)
    assert count_params(nn.Sequential(linear, nn.ReLU(), linear)) == 8 * 16 + 16


def test_measure_latency_interleaves_and_reports_positive_times():
    calls = []
    torch.set_num_threads(1)

    def fake(name, size):
        def run():
            calls.append(name)
            return torch.randn(size, size) @ torch.randn(size, size)
        return run

    result = measure_latency({"big": fake("big", 64), "small": fake("small", 8)},
                             repeats=5, warmup=2, threads=2, shuffle=False)
    assert calls[:4] == ["big", "big", "small", "small"]  # warm-up: each model in turn
    assert calls[4:] == ["big", "small"] * 5  # then one call of each model per round
    for stats in result.values():
        assert len(stats["times_ms"]) == 5 and stats["median_ms"] > 0
        assert stats["median_ms"] <= stats["p90_ms"] <= max(stats["times_ms"])
    big, small = result["big"]["median_ms"], result["small"]["median_ms"]
    assert speedup(result["big"], result["small"]) == big / small
    assert torch.get_num_threads() == 1  # restored after measuring with 2


def test_measure_latency_shuffles_rounds_reproducibly():
    def order_of(seed):
        calls = []
        models = {name: (lambda name=name: calls.append(name)) for name in "abc"}
        measure_latency(models, repeats=12, warmup=0, threads=None, shuffle=True, seed=seed)
        return calls

    first = order_of(0)
    assert first == order_of(0)
    rounds = [first[i:i + 3] for i in range(0, 36, 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1


def test_count_flops_counts_attention_matmuls():
    q = torch.randn(2, 4, 10, 8)
    flops = count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * 2 * 4 * 10 * 10 * 8)  # scores and context, 2 FLOPs per multiply-add


def test_contended_when_other_processes_leave_fewer_free_cores_than_the_threads():
    assert not contended(0.1, threads=2, cores=2)  # daemons and an idle DVC
    assert contended(0.5, threads=2, cores=2)  # half a core taken from a 2-thread timing
    assert not contended(1.0, threads=1, cores=2)  # the other core busy: one thread is free
    assert contended(1.5, threads=1, cores=2)
    assert not contended(6.0, threads=2, cores=16)  # a big machine with room to spare
    assert contended(15.0, threads=2, cores=16)


def test_watched_load_sees_a_busy_process_and_not_its_own_work():
    import os
    import subprocess
    import sys

    with watched_load() as alone:
        sum(i * i for i in range(3_000_000))  # this process's own work is not others' load
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # the interpreter has started and spins
        with watched_load() as loaded:
            time.sleep(1.0)
    finally:
        busy.kill()
        busy.wait()
    cores = len(os.sched_getaffinity(0))
    # this process kept a core busy, and none of it counts as others' (the suite's other
    # worker may take up to one more)
    assert alone.others_busy_cores < cores - 0.5
    assert loaded.others_busy_cores > 0.6  # the busy loop's core
    assert 0.9 < loaded.seconds < 5
    assert loaded.others_busy_cores <= cores + 0.1
