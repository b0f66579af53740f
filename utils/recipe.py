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
from utils.losses import WEIGHTED, SegmentationLoss

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


class PolyDecay:
    """The poly factor (1 - step/total)^power; an object, not a lambda, so that its total is saved in the
    scheduler's state_dict and a time budget can resize it while the run goes (the factor reaches 0 at the
    last step whatever the total became)."""

    def __init__(self, total_steps, power=0.9):
        self.total_steps, self.power = max(1, int(total_steps)), power

    def __call__(self, step):
        return max(0.0, 1 - min(step, self.total_steps) / self.total_steps) ** self.power


def poly_scheduler(optimizer, total_steps, power=0.9):
    """Polynomial decay per step, as in DeepLab and torchvision's segmentation reference."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, PolyDecay(total_steps, power))


def resize_schedule(scheduler, total_steps):
    """Point every poly factor of `scheduler` at a new total step count (time budgets)."""
    for decay in scheduler.lr_lambdas:
        decay.total_steps = max(1, int(total_steps))


def epochs_within_budget(budget_seconds, elapsed_seconds, done_epochs, epoch_seconds, validation_seconds,
                         val_every):
    """How many epochs a run can have in all when `budget_seconds` (from the run's start) must cover the rest:
    each further epoch costs `epoch_seconds` of training plus, every `val_every` epochs, one validation and save
    (`validation_seconds`), and the last epoch is always validated. Never fewer than the epochs already done."""
    remaining = budget_seconds - elapsed_seconds - validation_seconds  # the final validation and save
    per_epoch = epoch_seconds + validation_seconds / max(1, val_every)
    return done_epochs + max(0, int(remaining // per_epoch)) if per_epoch > 0 else done_epochs


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


def make_criterion(kind, dataset, progress, skeleton_weight=0.0):
    """The loss; class weights for the weighted kinds come from the training labels' pixel counts."""
    weights = None
    if kind in WEIGHTED:
        pixels, _, _ = data.label_statistics(dataset, progress=progress)
        weights = data.class_weights(pixels)
    whole = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return SegmentationLoss(kind, weights, skeleton_weight, whole.classes.crack_id)
