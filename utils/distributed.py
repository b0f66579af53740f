"""torchrun support: process group set-up, the device of this rank, and sharding for evaluation."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from utils.cli import resolve_device


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


def init_distributed(device_name):
    """Read torchrun's environment; NCCL on GPUs, gloo on CPU. Without torchrun: one process.

    More processes than GPUs share them round-robin; NCCL refuses two processes on one GPU, so
    CRACKSENSE_DIST_BACKEND=gloo runs them with gloo on CUDA tensors (scripts/gpu_check.sh does)."""
    device = resolve_device(device_name)
    world_size = launched_processes()
    if world_size <= 1:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    backend = os.environ.get("CRACKSENSE_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    dist.init_process_group(backend)
    return DistContext(rank, world_size, local_rank, device)


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
