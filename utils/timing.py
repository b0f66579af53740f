"""The one way latency is measured: the deployed network, the same warm-up, the median of interleaved rounds.

Every latency the project reports (torchvision_pruning.py's summary, benchmark.py, study.py, test.py's timing
rows, scripts/benchmark_*.py) comes from here, so the same two networks give the same speed-up everywhere:
- the network as deployed (`deployed`): a copy with the auxiliary head dropped, each BatchNorm folded into its
  convolution, in eval mode, run under torch.inference_mode;
- WARMUP untimed forwards of each network first (allocator, cuDNN autotuning, caches);
- then `runs` rounds A, B, A, B, ... so a machine that gets busier or cooler part-way slows every network alike;
- the median of each network's rounds.

Floor 3 (docs/ARCHITECTURE.md): it needs utils.model's aux-head and BatchNorm-folding primitives.
"""
import copy
import statistics
import time

import torch

from utils.model import fold_batchnorm, strip_aux_head

WARMUP = 3   # untimed forwards of each network before the timed rounds
ROUNDS = 5   # interleaved timed rounds when a caller has no option of its own


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


def deployed(model):
    """A copy of `model` as inference runs it: auxiliary head dropped, BatchNorm folded, eval mode. The caller's
    network is left as it was (it may still be trained)."""
    network = strip_aux_head(copy.deepcopy(model)).eval()
    return fold_batchnorm(network)


def forward_times(networks, inputs, runs, warmup=WARMUP, device="cpu"):
    """Seconds of each timed forward of each network on its input, interleaved, in inference mode: the one
    timing loop behind every latency. The networks must already be deployed (see `deployed`)."""
    with torch.inference_mode():
        calls = [lambda network=network, image=image: network(image) for network, image in zip(networks, inputs)]
        return interleaved_times(calls, runs, warmup, device)


def deployed_latencies(models, size, device, runs=ROUNDS, warmup=WARMUP):
    """Median seconds of one batch-1 forward of each model, deployed, on a size x size (or (height, width))
    image, timed together in interleaved rounds; `models` are left untouched."""
    height, width = (size, size) if isinstance(size, int) else size
    networks = [deployed(model).to(device) for model in models]
    image = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    times = forward_times(networks, [image] * len(networks), runs, warmup, device)
    return [statistics.median(seconds) for seconds in times]
