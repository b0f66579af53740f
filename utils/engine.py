"""train_one_epoch and evaluate: the one training loop and the one evaluation loop of the project.

train.py, the fine-tuning between pruning steps and test.py all call these; they take a model,
a loader and a device and return plain results, leaving files and printing to the caller.
"""
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from utils.cli import UserError, progress_enabled
from utils.data import CRACK_ID, IGNORE_INDEX
from utils.distributed import unwrap
from utils.metrics import ConfusionMatrix, ToleranceAccumulator, image_scores
from utils.model import Tiling, forward_logits, sliding_window_logits
from utils.timing import synchronize


def amp_dtype(device, requested="auto"):
    """The mixed-precision type: bfloat16 where the device computes it natively (CPU, CUDA compute capability
    8+, no GradScaler needed), float16 on older GPUs (with a GradScaler); `requested` overrides auto."""
    if requested != "auto":
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8:
        return torch.float16
    return torch.bfloat16


def native_mixed_precision(device):
    """Whether --amp auto turns mixed precision on: on CUDA GPUs (bfloat16 on compute capability 8+, float16
    with a GradScaler before) and on CPUs whose oneDNN has bfloat16 kernels (AVX-512 or AMX); off on other
    CPUs, where bfloat16 is emulated and slower (README, "Training from scratch on a CPU")."""
    if device.type == "cuda":
        return True
    try:
        return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def mixed_precision(amp, device, requested_dtype="auto"):
    """(on, dtype, GradScaler or None) of a Recipe's --amp (auto: native_mixed_precision) on `device`: bfloat16
    needs no scaler, float16 does and runs on CUDA only."""
    enabled = native_mixed_precision(device) if amp == "auto" else bool(amp)
    dtype = amp_dtype(device, requested_dtype)
    if enabled and dtype == torch.float16 and device.type != "cuda":
        raise UserError("--amp_dtype float16 needs a CUDA GPU; on the CPU use bfloat16 (or auto)")
    return enabled, dtype, torch.amp.GradScaler("cuda") if enabled and dtype == torch.float16 else None


def autocast(device, enabled, dtype=None):
    """Mixed precision in one place, in `dtype` (default: amp_dtype(device))."""
    return torch.autocast(device.type, dtype=dtype or amp_dtype(device), enabled=enabled)


def _all_reduce_sum(values, device):
    """Sum a list of numbers over ranks (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _freeze_frozen_batchnorm(model):
    """BatchNorm layers whose parameters are frozen also keep their running statistics."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            parameters = list(module.parameters(recurse=False))
            if parameters and not any(p.requires_grad for p in parameters):
                module.eval()


@dataclass(frozen=True)
class TrainStep:
    """What one optimisation step is made of: the loss, the optimiser, its per-step schedule, the float16 GradScaler
    (None: none), mixed precision (on or off, in `amp_dtype`, None: amp_dtype(device)), and a teacher's
    distillation term added to the loss (losses.Distillation; None: none)."""
    criterion: Callable
    optimizer: torch.optim.Optimizer
    scheduler: object = None
    scaler: object = None
    amp: bool = False
    amp_dtype: torch.dtype | None = None
    distillation: object = None


def train_one_epoch(model, loader, step, device, epoch, progress=True):
    """One pass over `loader` with TrainStep `step`; returns mean loss and the seconds spent waiting for data vs
    computing (the rest of the epoch's wall time: the device is synchronised once per epoch, not per step)."""
    model.train()
    _freeze_frozen_batchnorm(model)
    loss_sum = torch.zeros((), device=device)
    samples = 0
    data_seconds = 0.0
    bar = tqdm(loader, desc=f"epoch {epoch} train", disable=not progress_enabled(progress), leave=False,
               dynamic_ncols=True)
    started = ready = time.perf_counter()
    for index, (images, masks, _) in enumerate(bar):
        data_seconds += time.perf_counter() - ready
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, step.amp, step.amp_dtype):
            output = model(images)
            loss = step.criterion(output, masks)
            if step.distillation is not None:
                loss = loss + step.distillation.loss(output, images)
        _optimise(step, loss)
        loss_sum += loss.detach() * images.shape[0]
        samples += images.shape[0]
        if progress and index % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{step.optimizer.param_groups[0]['lr']:.2e}")
        ready = time.perf_counter()
    synchronize(device)
    compute_seconds = time.perf_counter() - started - data_seconds
    total_loss, total_samples = _all_reduce_sum([loss_sum.item(), samples], device)
    mean_loss = total_loss / max(1, total_samples)
    if not math.isfinite(mean_loss):
        raise UserError(f"the training loss became {mean_loss} in epoch {epoch}; lower --lr or use --amp False")
    return {"loss": mean_loss, "data_seconds": data_seconds, "compute_seconds": compute_seconds}


@torch.no_grad()
def recalibrate_batchnorm(model, batches, device):
    """Re-estimate every BatchNorm's running statistics as the plain average over `batches` ((images, masks) pairs)
    of the network as it is now, without gradients (EagleEye's adaptive BatchNorm): after channels are removed the
    old statistics describe features that no longer exist, and a pruned network scored on them predicts one class.
    The weights are untouched; the network's mode is put back."""
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    was_training = model.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches, not an exponential one
    model.train()
    try:
        for images, _ in batches:
            model(images.to(device, non_blocking=True))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)


def _optimise(step, loss):
    """Backward, optimiser step (through the GradScaler when there is one) and the schedule's step."""
    step.optimizer.zero_grad(set_to_none=True)
    if step.scaler is not None:
        step.scaler.scale(loss).backward()
        step.scaler.step(step.optimizer)
        step.scaler.update()
    else:
        loss.backward()
        step.optimizer.step()
    if step.scheduler is not None:
        step.scheduler.step()


@dataclass(frozen=True)
class EvalSettings:
    """How a split is scored: the class count, mixed precision, tiling (Tiling(): whole images), per-image scores,
    the crack tolerance in px (None: no tolerance counts), a progress bar."""
    num_classes: int
    amp: bool = False
    tiling: Tiling = Tiling()
    per_image: bool = False
    tolerance_px: int | None = None
    progress: bool = True
    crack_id: int | None = CRACK_ID  # the class crack metrics are about (ClassTable.crack_id); None: none


@dataclass
class EvalResult:
    """What one evaluation pass measured; every metric is derived from these counts."""
    confusion: ConfusionMatrix
    tolerance: ToleranceAccumulator | None
    loss: float | None
    per_image: list = field(default_factory=list)
    images: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0


def _predict(model, images, num_classes, size, tiling):
    if tiling.tile:
        return torch.cat([sliding_window_logits(model, image[None], num_classes, tiling, size).to(image.device)
                          for image in images])
    return forward_logits(model, images, num_classes, size=size)


@torch.no_grad()
def evaluate(model, loader, device, settings, criterion=None, on_prediction=None):
    """Score `loader` as EvalSettings `settings` say, at each label's own resolution, into one dataset-level
    confusion matrix (with the loss of `criterion` when given).

    Predictions are resized to the label, never the label to the prediction. Under torchrun each
    rank scores its shard and the counts are summed. on_prediction(index, prediction) sees every
    predicted mask (e.g. to save it).
    """
    model = unwrap(model)
    model.eval()
    num_classes, per_image, tolerance_px = settings.num_classes, settings.per_image, settings.tolerance_px
    confusion = ConfusionMatrix(num_classes, IGNORE_INDEX, device=device)
    crack_id = settings.crack_id
    tolerance = ToleranceAccumulator(tolerance_px) if tolerance_px is not None and crack_id is not None else None
    loss_sum, loss_pixels, images_seen, forward_seconds = 0.0, 0, 0, 0.0
    per_image_rows = []
    started = time.perf_counter()
    for images, masks, indices in tqdm(loader, desc="evaluate", disable=not progress_enabled(settings.progress),
                                       leave=False, dynamic_ncols=True):
        pairs = [(images, masks)] if isinstance(images, torch.Tensor) else \
            [(image[None], mask[None]) for image, mask in zip(images, masks)]
        predictions = []
        for batch_images, batch_masks in pairs:
            batch_images = batch_images.to(device, non_blocking=True)
            batch_masks = batch_masks.to(device, non_blocking=True)
            synchronize(device)
            forward_started = time.perf_counter()
            with autocast(device, settings.amp):
                logits = _predict(model, batch_images, num_classes, batch_masks.shape[-2:], settings.tiling)
            prediction = logits.max(dim=1).indices  # same as argmax, several times faster on CPU
            synchronize(device)
            forward_seconds += time.perf_counter() - forward_started
            confusion.update(batch_masks, prediction)
            if criterion is not None:
                valid = int((batch_masks != IGNORE_INDEX).sum())
                loss_sum += float(criterion(logits.float(), batch_masks)) * valid
                loss_pixels += valid
            predictions.extend(zip(batch_masks, prediction))
        for index, (mask, prediction) in zip(indices.tolist(), predictions):
            images_seen += 1
            if per_image:
                per_image_rows.append({"index": index, **image_scores(mask, prediction, num_classes, crack_id)})
            if tolerance is not None:
                tolerance.update(mask.cpu().numpy(), prediction.cpu().numpy(), crack_id, IGNORE_INDEX)
            if on_prediction is not None:
                on_prediction(index, prediction)
    seconds = time.perf_counter() - started
    confusion.all_reduce()
    if tolerance is not None:
        tolerance.all_reduce()
    loss_sum, loss_pixels, images_seen = _all_reduce_sum([loss_sum, loss_pixels, images_seen], device)
    if per_image and dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, per_image_rows)
        per_image_rows = sorted((row for rows in gathered for row in rows), key=lambda row: row["index"])
    return EvalResult(confusion=confusion, tolerance=tolerance,
                      loss=loss_sum / loss_pixels if criterion is not None and loss_pixels else None,
                      per_image=per_image_rows, images=int(images_seen), seconds=seconds,
                      forward_seconds=forward_seconds)
