"""What a training run is made of: the Recipe (one frozen dataclass, the one declaration of how a network trains),
seeding, the loaders, the optimiser, the poly schedule and the loss.

Middle floor (docs/ARCHITECTURE.md): train.py's run, the fine-tuning after pruning, the study and test.py build
their loops' inputs here, so a recipe is written once. Each Recipe field carries its option's help and argparse
type (utils.options.add_recipe_options walks the fields), so a new field is an option of every script that trains,
is checked once, saved with every checkpoint and recorded in a study's settings without further edits.
"""
import dataclasses
import os
import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Sampler

from utils import data
from utils.cli import UserError, bool_or_auto, check_number, str2bool
from utils.distributed import ShardSampler
from utils.losses import LOSSES, SegmentationLoss, loss_spec, losses_help

# --optimizer's choices: name -> builder over (parameters, lr, weight decay); SGD with DeepLab's momentum.
OPTIMIZERS = {
    "sgd": lambda parameters, lr, decay: torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=decay),
    "adam": lambda parameters, lr, decay: torch.optim.Adam(parameters, lr=lr, weight_decay=decay),
    "adamw": lambda parameters, lr, decay: torch.optim.AdamW(parameters, lr=lr, weight_decay=decay),
}


def setting(default, help, **argparse):
    """A Recipe field: its default and its option's help and argparse keywords (type, choices, nargs, metavar)."""
    return field(default=default, metadata={"help": help, "argparse": argparse})


@dataclass(frozen=True)
class Recipe:
    """How a network trains, wherever it trains: train.py, the fine-tuning of torchvision_pruning.py and of every
    study run. The defaults are train.py's. None means "not given" (train.py: a new run takes the default, a resumed
    run its own saved value; pruning: the value the pruned network was trained with) until `settled`. Every value
    given is checked here, once."""
    optimizer: str = setting("sgd", "optimiser", choices=tuple(OPTIMIZERS))
    lr: float = setting(0.01, "initial learning rate, poly decay per step", type=float)
    weight_decay: float = setting(1e-4, "weight decay", type=float)
    loss: str = setting("ce_weighted", f"segmentation loss ({losses_help()})", choices=tuple(LOSSES))
    skeleton_recall: float = setting(0.0, "weight of the skeleton recall loss on the crack class (the share of the "
                                          "labelled cracks' centre lines the prediction covers); 0: off", type=float)
    batch_size: int = setting(4, "images per step per process, at least 2 (BatchNorm in train mode)", type=int)
    crop_size: int = setting(512, "random crop side in px, never more than the smallest image side", type=int)
    scale_range: tuple = setting((0.5, 2.0), "random rescale factors of a training image before cropping",
                                 type=float, nargs=2, metavar=("LOW", "HIGH"))
    cat_max_ratio: float | None = setting(None, "redraw a crop (up to 10 times) while one class covers more than "
                                                "this fraction of it, so rare classes are seen (None: off)", type=float)
    amp: object = setting("auto", "mixed precision; auto: on for GPUs and for CPUs with bfloat16 kernels "
                                  "(AVX-512/AMX), off where bfloat16 is emulated", type=bool_or_auto, nargs="?",
                          const=True, metavar="auto|BOOL")
    deterministic: bool = setting(False, "deterministic algorithms (slower)", type=str2bool, nargs="?", const=True,
                                  metavar="BOOL")
    distill: float = setting(0.0, "weight of distillation from the dense teacher: per-pixel KL divergence between "
                                  "the softened class distributions of teacher and student, added to the loss; 0: "
                                  "off", type=float)
    distill_temperature: float = setting(2.0, "softening temperature of --distill (the loss is scaled by its "
                                              "square)", type=float)

    def __post_init__(self):
        for name, minimum in (("batch_size", 2), ("crop_size", 8)):
            check_number(name, getattr(self, name), minimum=minimum)
        check_number("lr", self.lr, above=0)
        for name in ("weight_decay", "skeleton_recall", "distill"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("distill_temperature", self.distill_temperature, above=0)
        check_number("cat_max_ratio", self.cat_max_ratio, above=0, maximum=1)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown --optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss is not None:
            loss_spec(self.loss)
        if self.scale_range is not None:
            low, high = (check_number("scale_range", value, above=0) for value in self.scale_range)
            if low > high:
                raise UserError(f"--scale_range LOW HIGH needs LOW <= HIGH, got {low:g} {high:g}")

    def settled(self, *sources):
        """Every field not given taken from the first of `sources` (dicts of option values: a resumed run's saved
        args, a pruned network's training args) that holds it, else the default; checked again."""
        filled = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            for source in sources:
                if value is None and (source or {}).get(item.name) is not None:
                    value = source[item.name]
            value = item.default if value is None else value
            filled[item.name] = tuple(value) if isinstance(value, list) else value
        return Recipe(**filled)


def recipe_fields():
    """The Recipe's fields in declaration order (the option group's order)."""
    return dataclasses.fields(Recipe)


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


def build_optimizer(model, recipe):
    """The Recipe's optimiser over the trainable parameters only (frozen layers stay out)."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise UserError("no trainable parameters: everything is frozen")
    return OPTIMIZERS[recipe.optimizer](parameters, recipe.lr, recipe.weight_decay)


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


class SeededSampler(Sampler):
    """The indices `order` yields, each paired with a seed of its own drawn from `generator` in the process that
    loads the batches: a sample's augmentation then depends on the run's seed and its place in the run alone, not
    on which data-loading worker makes it or how many there are, so --workers (and the share of the CPUs a torchrun
    process gets) leave a run's batches as they are."""

    def __init__(self, order, generator):
        self.order, self.generator = order, generator

    def set_epoch(self, epoch):
        """DistributedSampler's reshuffle for `epoch` (train.py under torchrun)."""
        self.order.set_epoch(epoch)

    def __iter__(self):
        for index in self.order:
            yield int(index), int(torch.randint(2**31 - 1, (1,), generator=self.generator))

    def __len__(self):
        return len(self.order)


def train_loader(dataset, batch_size, workers, seed, context):
    """Shuffled batches (sharded under torchrun), each sample's augmentation seeded by the loader (SeededSampler);
    the last short batch is dropped because BatchNorm in the ASPP pooling branch cannot train on a single sample."""
    if len(dataset) < batch_size * context.world_size:
        raise UserError(f"the training split has {len(dataset)} images, fewer than --batch_size {batch_size}"
                        f" x {context.world_size} process(es); lower --batch_size")
    stream = seed + context.rank
    order = DistributedSampler(dataset, context.world_size, context.rank, shuffle=True, seed=seed) \
        if context.enabled else RandomSampler(dataset, generator=torch.Generator().manual_seed(stream))
    sampler = SeededSampler(order, torch.Generator().manual_seed(stream + 2**32))  # a stream apart from the order's
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=context.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
                      collate_fn=data.collate, generator=torch.Generator().manual_seed(stream))  # not the global one


def eval_loader(dataset, batch_size, workers, context):
    """The split in order (sharded under torchrun). Its own generator: a loader draws its workers' base seed when a
    pass starts, and a persistent one only at its first pass, so drawing from the global stream would shift the
    dropout of whichever training comes after the first validation (a run's rows would then depend on what ran
    before it in the same process)."""
    sampler = ShardSampler(len(dataset), context.rank, context.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=context.device.type == "cuda", persistent_workers=workers > 0,
                      collate_fn=data.collate, generator=torch.Generator())


def make_criterion(kind, dataset, progress, skeleton_weight=0.0):
    """The loss; class weights for the weighted kinds come from the training labels' pixel counts."""
    weights = None
    if loss_spec(kind).class_weighted:
        pixels, _, _ = data.label_statistics(dataset, progress=progress)
        weights = data.class_weights(pixels)
    whole = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    return SegmentationLoss(kind, weights, skeleton_weight, whole.classes.crack_id)
