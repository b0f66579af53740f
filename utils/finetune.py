"""Recovery after pruning: the data of fine-tuning and scoring, BatchNorm recalibration, and fine-tuning by a step
budget with validation every N steps and the best kept, optionally distilled from the dense network.

Run floor (docs/ARCHITECTURE.md): the loop is utils.engine's train_one_epoch (fed a budget of batches instead of an
epoch), the optimiser, schedule, loaders and loss are utils.recipe's from the one Recipe train.py trains with, so a
pruned network is fine-tuned exactly as it was trained, for a stated number of steps.

Why: a pruned network scored on the BatchNorm statistics of the channels it had predicts background (EagleEye, Li
et al. 2020); a few batches without gradients re-estimate them. And a fine-tuning budget of a few steps says more
about the budget than about pruning (Liu et al. 2019), so the budget is given in steps, equal for every arm.
"""
import copy
import math
import time
from dataclasses import dataclass
from itertools import islice

import torch

from utils import data
from utils.cli import UserError, check_number, require_path
from utils.engine import EvalSettings, TrainStep, evaluate, mixed_precision, recalibrate_batchnorm, train_one_epoch
from utils.losses import Distillation
from utils.metrics import summary_metrics
from utils.recipe import build_optimizer, eval_loader, make_criterion, poly_scheduler, resize_schedule, train_loader

FINETUNE_DEFAULTS = {"finetune_steps": 0, "finetune_val_every": 0, "step_finetune_steps": 0, "bn_recalibrate": 20}
PLANNING_STEPS = 5  # a --finetune_minutes budget is sized from the cost of this many first steps


@dataclass(frozen=True)
class FinetuneBudget:
    """How long a pruned network is fine-tuned: --finetune_steps (or --finetune_minutes) after pruning, validated
    every --finetune_val_every steps (0: at the end) with the best kept; --step_finetune_steps between the steps of
    an iterative schedule. Checked when made."""
    finetune_steps: int = 0
    finetune_minutes: float | None = None
    finetune_val_every: int = 0
    step_finetune_steps: int = 0

    def __post_init__(self):
        for name in ("finetune_steps", "finetune_val_every", "step_finetune_steps"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("finetune_minutes", self.finetune_minutes, above=0)
        if self.finetune_minutes is not None and self.finetune_steps:
            raise UserError("--finetune_steps and --finetune_minutes both size the fine-tuning; give one")

    @property
    def tunes(self):
        """Whether any fine-tuning happens (then --data is needed)."""
        return bool(self.finetune_steps or self.finetune_minutes or self.step_finetune_steps)

    def describe(self):
        if self.finetune_minutes is not None:
            return f"{self.finetune_minutes:g} min of fine-tuning"
        return f"{self.finetune_steps} fine-tuning steps" if self.finetune_steps else "no fine-tuning"


@dataclass
class PruneData:
    """What the data-driven parts of pruning use: --data (Taylor gradients, BatchNorm recalibration, fine-tuning:
    its dataset, the recipe's loss and endless batches), --val_data, and the dense network that --distill learns
    from (`teacher`, set where pruning starts)."""
    train_set: data.S2DSDataset | None = None
    criterion: torch.nn.Module | None = None
    calibration: object = None
    val_loader: torch.utils.data.DataLoader | None = None
    teacher: torch.nn.Module | None = None


def endless_batches(loader):
    """(images, masks) forever: a new shuffled epoch whenever the loader runs out."""
    while True:
        for images, masks, _ in loader:
            yield images, masks


def prepare_data(train_dir, val_dir, recipe, loading, context):
    """Datasets, the recipe's loss and the endless calibration batches from --data and --val_data (each optional):
    crops, scale range and cat_max_ratio as the Recipe says; `loading` = (workers, seed)."""
    prepared, (workers, seed) = PruneData(), loading
    if train_dir:
        prepared.train_set = data.training_set(require_path(train_dir, "--data folder", "dir"), recipe.crop_size,
                                               tuple(recipe.scale_range), recipe.cat_max_ratio)
        prepared.criterion = make_criterion(recipe.loss, prepared.train_set, True,
                                            recipe.skeleton_recall).to(context.device)
        prepared.calibration = endless_batches(train_loader(prepared.train_set, recipe.batch_size, workers, seed,
                                                            context))
    if val_dir:
        val_set = data.S2DSDataset(require_path(val_dir, "--val_data folder", "dir"), data.EvalTransform())
        prepared.val_loader = eval_loader(val_set, 1, workers, context)
    return prepared


def validation_miou(model, prepared, device):
    """mIoU on --val_data, or None without it."""
    if prepared.val_loader is None:
        return None
    classes = prepared.val_loader.dataset.classes
    result = evaluate(model, prepared.val_loader, device, EvalSettings(classes.num_classes, crack_id=classes.crack_id))
    return summary_metrics(result.confusion.matrix)["mean_iou"]


def recalibrate(model, prepared, batches, device):
    """BatchNorm statistics re-estimated on `batches` fresh training batches (nothing without --data or at 0)."""
    if batches and prepared.calibration is not None:
        recalibrate_batchnorm(model, islice(prepared.calibration, batches), device)


@dataclass
class FinetuneResult:
    """What a fine-tuning did: steps run, the step kept (0: the network as it came) and its val mIoU, seconds."""
    steps: int = 0
    best_step: int = 0
    val_miou: float | None = None
    seconds: float = 0.0


def _batches_with_names(batches):
    """engine.train_one_epoch's (images, masks, names) triplets from (images, masks) pairs."""
    for images, masks in batches:
        yield images, masks, None


def _planned_steps(budget, done, elapsed):
    """A --finetune_minutes budget in steps, from the seconds the first `done` steps took."""
    return max(done, math.floor(60 * budget.finetune_minutes * done / max(elapsed, 1e-9)))


def _train_step(model, prepared, recipe, context):
    """The TrainStep of a fine-tuning: the recipe's optimiser and mixed precision, distillation from
    prepared.teacher when asked."""
    teacher = prepared.teacher
    if recipe.distill and teacher is None:
        raise UserError("--distill needs the dense network as its teacher; it is given where pruning starts")
    optimizer = build_optimizer(model, recipe)
    amp, dtype, scaler = mixed_precision(recipe.amp, context.device)
    distillation = Distillation(teacher, recipe.distill, recipe.distill_temperature) if recipe.distill else None
    return TrainStep(prepared.criterion, optimizer, poly_scheduler(optimizer, 1), scaler, amp, dtype, distillation)


def finetune(model, prepared, recipe, budget, context, steps=None):
    """Fine-tune `model` in place for `steps` optimisation steps (None: `budget`'s --finetune_steps, or as many as
    fit in --finetune_minutes) of the Recipe, batches in the order of prepared.calibration, validating every
    --finetune_val_every steps and at the end; the best network by val mIoU (the untuned one included, so
    fine-tuning never makes it worse) is kept when there is --val_data, else the last. Returns a FinetuneResult
    (with no steps: the network's val mIoU as it is)."""
    result, started = FinetuneResult(), time.perf_counter()
    timed = steps is None and budget.finetune_minutes is not None
    total = (PLANNING_STEPS if timed else budget.finetune_steps) if steps is None else steps
    if not total:
        result.val_miou = validation_miou(model, prepared, context.device)
        return result
    if prepared.train_set is None:
        raise UserError("fine-tuning needs --data TRAIN_DIR")
    step = _train_step(model, prepared, recipe, context)
    resize_schedule(step.scheduler, total)
    val_every = budget.finetune_val_every if steps is None else 0
    result.val_miou = validation_miou(model, prepared, context.device)
    best_state = copy.deepcopy(model.state_dict()) if result.val_miou is not None else None
    while result.steps < total:
        chunk = min(val_every or total, total - result.steps, PLANNING_STEPS if timed and not result.steps else total)
        train_one_epoch(model, _batches_with_names(islice(prepared.calibration, chunk)), step, context.device,
                        f"fine-tuning {result.steps + chunk}/{total}")
        result.steps += chunk
        if timed and result.steps == PLANNING_STEPS:
            total = _planned_steps(budget, result.steps, time.perf_counter() - started)
            resize_schedule(step.scheduler, total)
        if (val_every and result.steps % val_every == 0) or result.steps >= total:
            best_state = _keep_best(model, prepared, context, result, best_state)
    if best_state is not None and result.best_step != result.steps:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - started
    return result


def _keep_best(model, prepared, context, result, best_state):
    """Validate after result.steps: a better network than the best so far replaces it; without --val_data the last
    one is kept."""
    miou = validation_miou(model, prepared, context.device)
    if miou is None:
        result.best_step = result.steps
        return None
    print(f"  fine-tuning step {result.steps}: val mIoU {100 * miou:.2f}%", flush=True)
    if miou > result.val_miou:
        result.best_step, result.val_miou = result.steps, miou
        return copy.deepcopy(model.state_dict())
    return best_state
