"""The training run behind train.py: run folder, data, model, optimiser, the epoch loop, resuming.

Kept out of train.py so the script stays a front door and pruning's fine-tuning reuses the same
optimiser, scheduler and loader builders.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from utils import data, model as models
from utils.checkpoint import load_model, load_weights, make_checkpoint, read_checkpoint, save_atomic, unwrap
from utils.cli import UserError, require_path
from utils.distributed import ShardSampler, broadcast_object, cleanup, init_distributed
from utils.engine import evaluate, train_one_epoch
from utils.losses import SegmentationLoss
from utils.metrics import per_class_metrics, summary_metrics
from utils.report import plot_curves, write_csv

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


def _prepare_run_dir(run_dir, resume, overwrite):
    """Refuse to clobber a finished run unless --resume or --overwrite says what to do with it."""
    last = os.path.join(run_dir, "last.pth")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if resume:
        if not os.path.isfile(last):
            raise UserError(f"nothing to resume: {last} does not exist; drop --resume to start the run")
        return
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not overwrite:
            raise UserError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                            f"--overwrite to replace it, or choose another RUN_NAME")
        shutil.rmtree(run_dir)


def _build_model(args):
    """Dense from --arch/--init, or the pruned network of --pruned_model; weights on top if given."""
    pruning = None
    if args.pruned_model:
        model, metadata = load_model(args.pruned_model, allow_pickle=args.allow_pickle)
        model.train()
        arch, pruning = metadata["arch"], metadata.get("pruning")
        if pruning is None and metadata["format"] != "pickled_model":
            raise UserError(f"{args.pruned_model} is a dense checkpoint; pass it with --load_pretrained_weights")
        if metadata["format"] == "pickled_model":
            raise UserError(f"{args.pruned_model} is a pickled model without a pruning history; convert it with "
                            f"python torchvision_pruning.py --state_dict {args.pruned_model} --allow_pickle "
                            f"--pruning_ratio 0 --model_name NAME")
    else:
        arch = args.arch
        model = models.build(arch, data.NUM_CLASSES, args.init, args.aux_loss)
    if args.load_pretrained_weights:
        checkpoint = read_checkpoint(args.load_pretrained_weights, allow_pickle=args.allow_pickle)
        load_weights(model, checkpoint["model"], args.load_pretrained_weights)
    frozen = args.keep_feature_extract or (args.pruned_model and not args.train_pruned_fully)
    if frozen:
        models.freeze_all_but_head(model)
    return model, arch, pruning


def _epoch_row(epoch, train_stats, result, lr):
    per_class = per_class_metrics(result.confusion.matrix)
    row = {"epoch": epoch, "train_loss": train_stats["loss"], "val_loss": result.loss,
           "val_miou": summary_metrics(result.confusion.matrix)["mean_iou"]}
    row.update({f"val_iou_{name}": float(iou) for name, iou in zip(data.CLASS_NAMES, per_class["iou"])})
    row.update({"lr": lr, "data_seconds": round(train_stats["data_seconds"], 3),
                "compute_seconds": round(train_stats["compute_seconds"], 3)})
    return row


def run(args):
    """Train, evaluate every epoch, keep last.pth/best.pth/metrics.csv/curves.png current."""
    context = init_distributed(args.device)
    try:
        _run(args, context)
    finally:
        cleanup(context)


def _run(args, context):
    require_path(args.train_dir, "training folder", "dir")
    require_path(args.val_dir, "validation folder", "dir")
    run_dir = os.path.join(args.output_dir, "runs", args.run_name)
    if context.is_main:
        _prepare_run_dir(run_dir, args.resume, args.overwrite)
    broadcast_object(None, context)
    seed_everything(args.seed + context.rank, args.deterministic)
    device, main = context.device, context.is_main

    train_set = data.S2DSDataset(args.train_dir, data.train_transform(args.crop_size))
    val_set = data.S2DSDataset(args.val_dir, data.EvalTransform(args.eval_size))
    model, arch, pruning = _build_model(args)
    criterion = make_criterion(args.loss, train_set, main).to(device)
    model.to(device)
    if context.enabled:
        if device.type == "cuda":  # SyncBatchNorm has no CPU kernels; gloo runs keep per-process statistics
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = train_loader(train_set, args.batch_size, args.workers, args.seed, context)
    val_loader = eval_loader(val_set, 1 if args.eval_size is None else args.batch_size, args.workers, context)
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    scheduler = poly_scheduler(optimizer, args.epochs * len(loader))
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None

    start_epoch, best, history, stale = 1, -1.0, [], 0
    if args.resume:
        state = read_checkpoint(os.path.join(run_dir, "last.pth"))
        if state["arch"] != arch:
            raise UserError(f"{run_dir}/last.pth is a {state['arch']} run, not {arch}")
        load_weights(unwrap(model), state["model"], f"{run_dir}/last.pth")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, best = state["epoch"] + 1, state["best_metric"]
        history, stale = list(state["metrics"]), state.get("epochs_without_improvement", 0)
        if main:
            print(f"resuming {run_dir} after epoch {state['epoch']} (best val mIoU {100 * best:.2f}%)")

    writer = None
    if main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as handle:
            json.dump({**vars(args), "world_size": context.world_size, "torch": torch.__version__}, handle,
                      indent=2)
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(run_dir)

    for epoch in range(start_epoch, args.epochs + 1):
        if args.patience and stale >= args.patience:
            break
        if context.enabled:
            loader.sampler.set_epoch(epoch)
        lr = optimizer.param_groups[0]["lr"]
        stats = train_one_epoch(model, loader, criterion, optimizer, device, epoch, scheduler, scaler,
                                args.amp, progress=main)
        result = evaluate(model, val_loader, device, data.NUM_CLASSES, criterion, args.amp, progress=main)
        row = _epoch_row(epoch, stats, result, lr)
        history.append(row)
        improved = row["val_miou"] > best
        best, stale = (row["val_miou"], 0) if improved else (best, stale + 1)
        if main:
            checkpoint = make_checkpoint(
                model, arch, pruning=pruning, optimizer=optimizer.state_dict(),
                lr_scheduler=scheduler.state_dict(), scaler=scaler.state_dict() if scaler else None,
                epoch=epoch, best_metric=best, epochs_without_improvement=stale, metrics=history,
                args=vars(args))
            if improved:
                save_atomic(checkpoint, os.path.join(run_dir, "best.pth"))
            save_atomic(checkpoint, os.path.join(run_dir, "last.pth"))
            write_csv(history, os.path.join(run_dir, "metrics.csv"))
            plot_curves(history, os.path.join(run_dir, "curves.png"), data.CLASS_NAMES)
            if writer is not None:
                for key, value in row.items():
                    if key != "epoch" and value is not None:
                        writer.add_scalar(key, value, epoch)
            print(f"epoch {epoch}/{args.epochs}: train loss {row['train_loss']:.4f}  val loss "
                  f"{row['val_loss']:.4f}  val mIoU {100 * row['val_miou']:.2f}%  crack IoU "
                  f"{100 * row['val_iou_crack']:.2f}%  data {row['data_seconds']:.1f}s  compute "
                  f"{row['compute_seconds']:.1f}s{'  (best)' if improved else ''}", flush=True)
    if writer is not None:
        writer.close()
    if main:
        print(f"done: best val mIoU {100 * best:.2f}%; outputs in {run_dir}/ "
              f"(best.pth, last.pth, metrics.csv, curves.png, args.json)")
