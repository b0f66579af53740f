"""torchrun support: process group set-up, the device of this rank, sharding for evaluation, and a launch whose
processes share out independent jobs (the study's runs)."""
import itertools
import json
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from utils.cli import UserError, resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.world_size > 1


def launched_processes():
    """How many processes torchrun started for this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _this_process(device_name):
    """(rank, world size, local rank, device) from torchrun's environment: LOCAL_RANK's GPU on CUDA (more processes
    than GPUs share them round-robin)."""
    device, world_size = resolve_device(device_name), launched_processes()
    if world_size <= 1:
        return 0, 1, 0, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return rank, world_size, local_rank, device


def init_distributed(device_name):
    """Read torchrun's environment; NCCL on GPUs, gloo on CPU. Without torchrun: one process.

    NCCL refuses two processes on one GPU, so CRACKSENSE_DIST_BACKEND=gloo runs them with gloo on CUDA tensors
    (scripts/gpu_check.sh does)."""
    rank, world_size, local_rank, device = _this_process(device_name)
    if world_size > 1:
        dist.init_process_group(os.environ.get("CRACKSENSE_DIST_BACKEND")
                                or ("nccl" if device.type == "cuda" else "gloo"))
    return DistContext(rank, world_size, local_rank, device)


@dataclass
class Launch(DistContext):
    """The processes torchrun started to share out independent jobs (the study's runs). They talk only through the
    launch's key-value store, never a process group: each job's training and scoring stay one process's own, so
    nothing they reduce waits for another process. Without torchrun: one process, the same calls."""
    store: object = None  # torch.distributed.Store; None for one process
    _exchanges: itertools.count = field(default_factory=itertools.count, repr=False)

    def own(self):
        """The context of a job this process runs by itself: its device, a world of one."""
        return DistContext(device=self.device)

    def from_first(self, work):
        """work() run by the first process alone (what must happen once: a file opened, a score taken); its
        result, as JSON makes it, on every process; a UserError it raised is raised by every process, so they all
        stop with the same one line."""
        if not self.enabled:
            return json.loads(json.dumps(work()))
        key = f"exchange/{next(self._exchanges)}"
        if self.is_main:
            try:
                outcome = {"value": work()}
            except UserError as error:
                outcome = {"error": str(error)}
            self.store.set(key, json.dumps(outcome))
        outcome = json.loads(self.store.get(key))
        if "error" in outcome:
            raise UserError(outcome["error"])
        return outcome["value"]

    def barrier(self, label):
        """Wait until every process has reached the barrier `label` (distinct within one launch)."""
        if self.enabled:
            self.store.set(f"barrier/{label}/{self.rank}", "1")
            self.store.wait([f"barrier/{label}/{rank}" for rank in range(self.world_size)])

    def claimed(self, count, label):
        """The indices in range(count) this process should run, each claimed from a counter every process shares,
        so a process that finishes early takes the next job and none runs twice. `label` names the counter
        (distinct within one launch)."""
        if not self.enabled:
            yield from range(count)
            return
        while (index := self.store.add(f"jobs/{label}", 1) - 1) < count:
            yield index


def join_launch(device_name, timeout):
    """This process's Launch: under torchrun, the launch's store (the one init_process_group would use) under a
    prefix of this attempt, so a restarted launch starts its counters afresh; `timeout` bounds every wait for the
    others (a process that dies is noticed by torchrun, which stops the rest)."""
    rank, world_size, local_rank, device = _this_process(device_name)
    if world_size <= 1:
        return Launch(device=device)
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return Launch(rank, world_size, local_rank, device, dist.PrefixStore(f"cracksense/{attempt}", store))


def unwrap(model):
    """The bare network under DistributedDataParallel."""
    return model.module if hasattr(model, "module") else model


def cleanup(context):
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(value, context):
    """Rank 0's value on every rank (e.g. a decision to stop early)."""
    if not context.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class ShardSampler(torch.utils.data.Sampler):
    """Every rank evaluates indices rank, rank+world, ...: unlike DistributedSampler it never pads
    with duplicates, so the all-reduced confusion matrix counts each image exactly once."""

    def __init__(self, length, rank, world_size):
        self.indices = list(range(rank, length, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
