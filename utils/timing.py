"""The one way latency is measured: warm-up, CUDA synchronisation, and interleaved rounds.

Every latency the project reports (pruning summary, benchmark.py, the study, scripts/benchmark_*.py)
comes from here, so they agree on what a millisecond means.
"""
import time

import torch


def synchronize(device):
    """Wait for queued GPU work; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, runs, warmup, device):
    """Seconds of each of `runs` calls of `call()` after `warmup` untimed ones, GPU work waited for."""
    for _ in range(warmup):
        call()
    synchronize(device)
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def interleaved_times(calls, runs, warmup, device):
    """Per call, `runs` timings taken in rounds (A, B, A, B, ...) after `warmup` untimed calls each, so a
    machine that gets busier or cooler part-way slows every variant alike."""
    for call in calls:
        time_calls(call, 0, warmup, device)
    times = [[] for _ in calls]
    for _ in range(runs):
        for call, seconds in zip(calls, times):
            seconds.extend(time_calls(call, 1, 0, device))
    return times
