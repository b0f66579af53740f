"""What a training run is made of: seeding, the loaders, the optimiser, the poly schedule and the loss.

Middle floor (docs/ARCHITECTURE.md): train.py's run, the fine-tuning between pruning steps, the study
and test.py build their loops' inputs here, so a recipe is written once.
"""
import os
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from utils import data
from utils.cli import UserError
from utils.distributed import ShardSampler
from utils.losses import SegmentationLoss

OPTIMIZERS = ("sgd", "adam", "adamw")


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.benchmark = True


def build_optimizer(model, name, lr, weight_decay, momentum=0.9):
    """Optimiser over the trainable parameters only (frozen layers stay out)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise UserError("no trainable parameters: everything is frozen")
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise UserError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def poly_scheduler(optimizer, total_steps, power=0.9):
    """Polynomial decay per step, as in DeepLab and torchvision's segmentation reference."""
    total_steps = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - min(step, total_steps) / total_steps) ** power)


def train_loader(dataset, batch_size, workers, seed, context):
    """Shuffled batches (sharded under torchrun); the last short batch is dropped because
    BatchNorm in the ASPP pooling branch cannot train on a single sample."""
    if len(dataset) < batch_size * context.world_size:
        raise UserError(f"the training split has {len(dataset)} images, fewer than --batch_size {batch_size}"
                        f" x {context.world_size} process(es); lower --batch_size")
    sampler = DistributedSampler(dataset, context.world_size, context.rank, shuffle=True, seed=seed) \
        if context.enabled else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=context.device.type == "cuda", drop_last=True,
                      persistent_workers=workers > 0, collate_fn=data.collate,
                      generator=torch.Generator().manual_seed(seed + context.rank))


def eval_loader(dataset, batch_size, workers, context):
    sampler = ShardSampler(len(dataset), context.rank, context.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=context.device.type == "cuda", persistent_workers=workers > 0,
                      collate_fn=data.collate)


def make_criterion(kind, dataset, progress):
    """The loss; class weights for ce_weighted come from the training labels' pixel counts."""
    weights = None
    if kind == "ce_weighted":
        pixels, _, _ = data.label_statistics(dataset, progress=progress)
        weights = data.class_weights(pixels)
    return SegmentationLoss(kind, weights)
