"""The training run behind train.py: run folder, data, model, optimiser, the epoch loop, resuming.

A run-floor module (docs/ARCHITECTURE.md): the loop itself is utils.engine's, the loaders, optimiser
and loss are utils.recipe's, so pruning's fine-tuning and the study train exactly the same way.
"""
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._dynamo.exc import TorchDynamoException

from utils import data, model as models
from utils.checkpoint import (build_from_checkpoint, checkpoint_classes, for_deployment, load_model, load_weights, make_checkpoint,
                              read_checkpoint, require_resume_state, save_atomic)
from utils.cli import UserError, check_number, plain_name, require_path
from utils.distributed import broadcast_object, cleanup, init_distributed
from utils.engine import EvalSettings, TrainStep, evaluate, mixed_precision, train_one_epoch
from utils.files import hold_folder_lock, release_folder_locks, replace_atomically
from utils.metrics import per_class_metrics, summary_metrics
from utils.prune_ops import slice_extra_outputs
from utils.losses import Distillation
from utils.recipe import (Recipe, build_optimizer, epochs_within_budget, eval_loader, make_criterion, poly_scheduler,
                          resize_schedule, seed_everything, train_loader)
from utils.report import plot_curves, write_csv


def _prepare_run_dir(run_dir, resume, overwrite):
    """Refuse to clobber a finished run unless --resume or --overwrite says what to do with it."""
    last = os.path.join(run_dir, "last.pth")
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if resume:
        if not os.path.isfile(last):
            raise UserError(f"nothing to resume: {last} does not exist; drop --resume to start the run")
        return
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is a file, not a run folder; move it away or choose another RUN_NAME")
    saved = [name for name in ("last.pth", "best.pth") if os.path.exists(os.path.join(run_dir, name))]
    if saved and not overwrite:
        raise UserError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                        f"--overwrite to replace it, or choose another RUN_NAME")
    for path in _run_files(run_dir):  # the earlier run's (--overwrite), or what a run that failed early left
        os.remove(path)
    others = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if saved and others:
        print(f"--overwrite: removed the earlier run's files from {run_dir}; left {len(others)} other "
              f"file(s) there: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}")


RUN_FILES = ("last.pth", "best.pth", "metrics.csv", "curves.png", "args.json")


def _run_files(run_dir):
    """The files a run writes into its folder (TensorBoard's event files too) that are there now; nothing else
    in the folder is ever removed."""
    if not os.path.isdir(run_dir):
        return []
    return [os.path.join(run_dir, name) for name in sorted(os.listdir(run_dir))
            if name in RUN_FILES or name.startswith("events.out.tfevents.")]


RUN_DEFAULTS = {
    "arch": models.DEFAULT_ARCH, "init": "coco", "aux_loss": True, "keep_feature_extract": False,
    "pruned_model": None, "train_pruned_fully": True, "load_pretrained_weights": None, "teacher": None,
    "output_stride": None, "epochs": 30, "steps": None, "max_minutes": None, "val_every": 1, "eval_size": None,
    "patience": 0, "seed": 42,
}
"""The network and schedule settings that make a run what it is (the recipe's are utils.recipe.Recipe's defaults).
train.py leaves the ones not given as None: a new run takes these defaults, a resumed run its own saved values (so it
never needs the COCO weights its last.pth replaces)."""


@dataclass(frozen=True)
class NetworkSpec:
    """The network a run trains: None where train.py was not told, until TrainOptions.settled fills it."""
    arch: str | None = None
    init: str | None = None
    output_stride: int | None = None
    aux_loss: bool | None = None
    keep_feature_extract: bool | None = None
    pruned_model: str | None = None
    train_pruned_fully: bool | None = None
    load_pretrained_weights: str | None = None
    teacher: str | None = None
    allow_pickle: bool = False


@dataclass(frozen=True)
class Schedule:
    """How long a run trains, how often it validates, its seed: None where train.py was not told, until
    TrainOptions.settled fills it. Checked here, once."""
    epochs: int | None = None
    steps: int | None = None
    max_minutes: float | None = None
    val_every: int | None = None
    eval_size: int | None = None
    patience: int | None = None
    seed: int | None = None

    def __post_init__(self):
        for name in ("epochs", "steps", "val_every"):
            check_number(name, getattr(self, name), minimum=1)
        check_number("eval_size", self.eval_size, minimum=8)
        check_number("max_minutes", self.max_minutes, above=0)
        check_number("patience", self.patience, minimum=0)
        check_number("seed", self.seed, minimum=0)
        if self.steps is not None and self.max_minutes is not None:
            raise UserError("--steps and --max_minutes both size the run; give one")


@dataclass(frozen=True)
class RunPlace:
    """Where a run reads and writes, and on what it runs; none of it changes what the network learns."""
    train_dir: str
    val_dir: str
    run_name: str
    output_dir: str = "results"
    resume: bool = False
    overwrite: bool = False
    device: str = "auto"
    workers: int = 4
    tensorboard: bool = False
    amp_dtype: str = "auto"
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self):
        if self.workers < 0:
            raise UserError("--workers cannot be negative")


@dataclass(frozen=True)
class TrainOptions:
    """Everything train.py was told, typed: the network, the recipe, the schedule, the place. Saved flat (args.json
    and the checkpoint's `args`), so a run folder can be repeated with --config and resumed with its own settings."""
    network: NetworkSpec
    recipe: Recipe
    schedule: Schedule
    place: RunPlace

    def settled(self, saved=None):
        """The run settings not given filled from `saved` (the resumed run's args), else RUN_DEFAULTS or the Recipe's
        defaults; a given value that contradicts the resumed run is refused, except --epochs, which may lengthen or
        shorten it."""
        saved = {key: tuple(value) if isinstance(value, list) else value for key, value in (saved or {}).items()}
        for key, given in {**dataclasses.asdict(self.network), **dataclasses.asdict(self.recipe),
                           **dataclasses.asdict(self.schedule)}.items():
            if key in saved and given is not None and given != saved[key] and key not in ("epochs", "allow_pickle"):
                raise UserError(f"--{key} {given} contradicts the run being resumed (its last.pth says {key} "
                                f"{saved[key]}); drop --{key} to keep the run's own, or start a new RUN_NAME")

        def filled(spec):
            return dataclasses.replace(spec, **{key: saved.get(key, RUN_DEFAULTS[key]) for key in _names(spec)
                                                if key in RUN_DEFAULTS and getattr(spec, key) is None})

        return TrainOptions(filled(self.network), self.recipe.settled(saved), filled(self.schedule), self.place)

    def flat(self):
        """The options under their command-line names: args.json and the checkpoint's `args`."""
        return {**dataclasses.asdict(self.network), **dataclasses.asdict(self.recipe),
                **dataclasses.asdict(self.schedule), **dataclasses.asdict(self.place)}


def _names(spec):
    return [field.name for field in dataclasses.fields(spec)]


def _build_model(network, classes, resumed=None):
    """The resumed run's own network (rebuilt from last.pth, no pretrained weights built), or a new one
    predicting `classes` (the data's ClassTable); frozen as the run's settings say."""
    if resumed is None:
        model, arch, pruning = _new_model(network, classes)
    else:
        _same_classes(checkpoint_classes(resumed, "the run's last.pth"), classes, "the run's last.pth")
        model = load_weights(build_from_checkpoint(resumed), resumed["model"], "the run's last.pth").train()
        arch, pruning = resumed["arch"], resumed.get("pruning")
    if network.keep_feature_extract or (network.pruned_model and not network.train_pruned_fully):
        models.freeze_all_but_head(model)
    return model, arch, pruning


def _same_classes(found, wanted, source):
    """Refuse a network whose classes are not the data's: its outputs would mean other things."""
    if found != wanted:
        raise UserError(f"{source} predicts {found.num_classes} classes ({', '.join(found.names)}) but the data has "
                        f"{wanted.num_classes} ({', '.join(wanted.names)}); use a network trained on these classes")


def _new_model(network, classes):
    """Dense from --arch/--init, or the pruned network of --pruned_model; weights on top if given."""
    pruning = None
    if network.pruned_model:
        model, metadata = load_model(network.pruned_model, allow_pickle=network.allow_pickle)
        _same_classes(checkpoint_classes(metadata, network.pruned_model), classes, network.pruned_model)
        model.train()
        arch, pruning = metadata["arch"], metadata.get("pruning")
        if pruning is None and metadata["format"] != "pickled_model":
            raise UserError(f"{network.pruned_model} is a dense checkpoint; pass it with --load_pretrained_weights")
        if metadata["format"] == "pickled_model":
            raise UserError(f"{network.pruned_model} is a pickled model without a pruning history; convert it with "
                            f"python torchvision_pruning.py --state_dict {network.pruned_model} --allow_pickle "
                            f"--pruning_ratio 0 --model_name NAME")
    else:
        arch = network.arch
        init = "none" if network.load_pretrained_weights else network.init  # W replaces what --init would download
        model = models.build(arch, classes.num_classes, init, network.aux_loss)
    recorded = None
    if network.load_pretrained_weights:
        checkpoint = read_checkpoint(network.load_pretrained_weights, allow_pickle=network.allow_pickle)
        weights = slice_extra_outputs(model, checkpoint["model"], classes.num_classes)  # the thesis' 8th output
        load_weights(model, weights, network.load_pretrained_weights)
        recorded = checkpoint.get("output_stride")
    stride = network.output_stride or recorded  # the given stride, else the weights' own (else the network's: 8)
    if stride is not None and models.has_output_stride(arch):
        models.set_output_stride(model, stride)
    elif network.output_stride is not None:
        raise UserError(f"--output_stride applies to the DeepLabV3-ResNet networks only, not {arch}")
    return model, arch, pruning


def _epoch_row(epoch, step, train_stats, result, lr, class_names):
    """metrics.csv's row for a validated epoch: train loss and seconds summed over the epochs since the last
    validation (train_stats), then the validation scores."""
    per_class = per_class_metrics(result.confusion.matrix)
    row = {"epoch": epoch, "step": step, "train_loss": train_stats["loss"], "val_loss": result.loss,
           "val_miou": summary_metrics(result.confusion.matrix)["mean_iou"]}
    row.update({f"val_iou_{name}": float(iou) for name, iou in zip(class_names, per_class["iou"])})
    row.update({"lr": lr, "data_seconds": round(train_stats["data_seconds"], 3),
                "compute_seconds": round(train_stats["compute_seconds"], 3),
                "val_seconds": round(result.seconds, 3)})
    return row


@dataclass
class Parts:
    """Everything one training run steps through."""
    model: torch.nn.Module
    arch: str
    pruning: list | None
    criterion: torch.nn.Module
    loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: object = None
    amp_dtype: torch.dtype = None
    amp: bool = False
    epochs: int = 0
    classes: data.ClassTable = data.S2DS_CLASSES
    distillation: Distillation | None = None


@dataclass
class Progress:
    """Where the run stands: the next epoch, the best val mIoU so far, the metric rows (one per validation),
    validations without gain, and the epochs planned in all (a time budget resizes them)."""
    start_epoch: int = 1
    best: float = -1.0
    history: list = field(default_factory=list)
    stale: int = 0
    epochs: int = 0
    validation_seconds: float = 0.0  # what the last validation and save cost
    save_seconds: float = 0.0

    def record(self, row):
        """Add a validated epoch's row; True when it is the best so far."""
        self.history.append(row)
        improved = row["val_miou"] > self.best
        self.best, self.stale = (row["val_miou"], 0) if improved else (self.best, self.stale + 1)
        return improved


def run(options):
    """Train as TrainOptions `options` say, evaluate, keep last.pth/best.pth/metrics.csv/curves.png current."""
    context = init_distributed(options.place.device)
    try:
        _train(options, context)
    except TorchDynamoException as error:  # torch.compile fails at the first forward, not when asked
        if not options.place.compile:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"--compile failed on this machine ({reason[:200]}); drop --compile") from None
    finally:
        release_folder_locks()
        cleanup(context)


def _train(options, context):
    started = time.perf_counter()
    run_dir = _set_up_run_dir(options.place, context)
    resumed = _read_last(run_dir, context) if options.place.resume else None
    options = options.settled(resumed.get("args") if resumed else None)
    recipe, schedule = options.recipe, options.schedule
    seed_everything(schedule.seed + context.rank, recipe.deterministic)
    parts = _set_up(options, context, resumed)
    progress = _resume(parts, resumed, run_dir, context) if resumed else Progress()
    progress.epochs = parts.epochs
    resize_schedule(parts.scheduler, progress.epochs * len(parts.loader))  # a resumed run's --epochs may differ
    budget = schedule.max_minutes * 60 if schedule.max_minutes and not resumed else None  # a resumed run keeps its plan
    writer = _open_outputs(options, run_dir, context)
    pending, epoch = [], progress.start_epoch  # the epochs trained since the last validation
    while epoch <= progress.epochs and not (schedule.patience and progress.stale >= schedule.patience):
        pending.append(_train_epoch(parts, context, epoch))
        if epoch == 1 or _validates(epoch, schedule.val_every, progress.epochs):
            improved = _validate(parts, context, progress, epoch, pending)
            if budget is not None:
                _plan_epochs(parts, progress, budget, time.perf_counter() - started, pending, schedule.val_every,
                             epoch, context)
            _save_validated(parts, options, (run_dir, writer), progress, improved, context)
            pending = []
        epoch += 1
    if writer is not None:
        writer.close()
    if context.is_main:
        print(f"done: best val mIoU {100 * progress.best:.2f}%; outputs in {run_dir}/ "
              f"(best.pth, last.pth, metrics.csv, curves.png, args.json)")


def _validates(epoch, val_every, epochs):
    """Validation (and saving) follows epoch 1, every val_every-th epoch and the last one."""
    return epoch % max(1, val_every) == 0 or epoch >= epochs


def _plan_epochs(parts, progress, budget, elapsed, pending, val_every, epoch, context):
    """Size the run to its time budget from what the epochs cost so far (epoch 1 carries the warm-up, so it is
    left out once there are others), and stretch the poly schedule to the planned last step. Rank 0 decides."""
    timed = pending[1:] if epoch > 1 and len(pending) > 1 else pending
    epoch_seconds = sum(s["data_seconds"] + s["compute_seconds"] for s in timed) / len(timed)
    planned = epochs_within_budget(budget, elapsed, epoch, epoch_seconds, progress.validation_seconds, val_every)
    progress.epochs = max(epoch, broadcast_object(planned, context))
    resize_schedule(parts.scheduler, progress.epochs * len(parts.loader))


def _validate(parts, context, progress, epoch, pending):
    """Score the validation split after `epoch` (pending: the epochs' stats since the last validation) and record
    the row; True when it is the best so far. Its seconds, with the last save's, are what a validation costs."""
    started = time.perf_counter()
    result = evaluate(parts.model, parts.val_loader, context.device,
                      EvalSettings(parts.classes.num_classes, parts.amp, progress=context.is_main,
                                   crack_id=parts.classes.crack_id), parts.criterion)
    stats = {"loss": sum(s["loss"] for s in pending) / len(pending),
             **{key: sum(s[key] for s in pending) for key in ("data_seconds", "compute_seconds")}}
    row = _epoch_row(epoch, parts.scheduler.last_epoch, stats, result, parts.optimizer.param_groups[0]["lr"],
                     parts.classes.names)
    improved = progress.record(row)
    progress.validation_seconds = time.perf_counter() - started + progress.save_seconds
    return improved


def _save_validated(parts, options, outputs, progress, improved, context):
    """Rank 0: last.pth, best.pth when better, metrics.csv, curves.png, the epoch's line."""
    started = time.perf_counter()
    if context.is_main:
        _save(parts, options, outputs[0], progress, improved, outputs[1])
        _print_epoch(progress.history[-1], progress.epochs, improved)
    progress.save_seconds = time.perf_counter() - started


def _set_up_run_dir(place, context):
    """OUTPUT_DIR/runs/RUN_NAME, checked (and emptied for --overwrite) by rank 0 before the others go on."""
    require_path(place.train_dir, "training folder", "dir")
    require_path(place.val_dir, "validation folder", "dir")
    run_dir = os.path.join(place.output_dir, "runs", plain_name(place.run_name, "RUN_NAME"))
    if context.is_main:
        hold_folder_lock(run_dir, f"{run_dir} is in use by another train.py that is still running; wait for it to "
                                  f"finish or choose another RUN_NAME")
        _prepare_run_dir(run_dir, place.resume, place.overwrite)
    broadcast_object(None, context)
    return run_dir


def _set_up(options, context, resumed=None):
    """Data, model (wrapped for DDP), loss, loaders, optimiser, schedule, scaler and the epochs to run."""
    device, recipe, schedule, place = context.device, options.recipe, options.schedule, options.place
    train_set = data.training_set(place.train_dir, recipe.crop_size, tuple(recipe.scale_range), recipe.cat_max_ratio)
    val_set = data.S2DSDataset(place.val_dir, data.EvalTransform(schedule.eval_size))
    classes = train_set.classes
    if val_set.classes != classes:
        raise UserError(f"the training and validation splits have different class tables ({', '.join(classes.names)} "
                        f"vs {', '.join(val_set.classes.names)}); give both splits the same classes.csv")
    model, arch, pruning = _build_model(options.network, classes, resumed)
    criterion = make_criterion(recipe.loss, train_set, context.is_main, recipe.skeleton_recall).to(device)
    distillation = _distillation(options, classes, device)
    model.to(device)
    _speed_options(model, place)
    if context.enabled:
        if device.type == "cuda":  # SyncBatchNorm has no CPU kernels; gloo runs keep per-process statistics
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    loader = train_loader(train_set, recipe.batch_size, place.workers, schedule.seed, context)
    val_loader = eval_loader(val_set, 1 if schedule.eval_size is None else recipe.batch_size, place.workers, context)
    optimizer = build_optimizer(model, recipe)
    epochs = schedule.epochs
    if schedule.steps and resumed is None:  # a schedule given in steps: whole epochs that hold them
        epochs = math.ceil(schedule.steps / len(loader))
    scheduler = poly_scheduler(optimizer, epochs * len(loader))
    amp, dtype, scaler = mixed_precision(recipe.amp, device, place.amp_dtype)
    return Parts(model, arch, pruning, criterion, loader, val_loader, optimizer, scheduler, scaler, dtype, amp, epochs,
                 classes, distillation)


def _distillation(options, classes, device):
    """--distill's teacher (--teacher, a network of the data's classes, on `device`), or None without --distill."""
    recipe, teacher = options.recipe, options.network.teacher
    if not recipe.distill:
        if teacher:
            raise UserError("--teacher is the network --distill learns from; add --distill WEIGHT or drop --teacher")
        return None
    if not teacher:
        raise UserError("--distill needs --teacher W.pth: the network the student learns from (e.g. the dense network "
                        "a --pruned_model was cut from)")
    network, metadata = load_model(teacher, allow_pickle=options.network.allow_pickle)
    _same_classes(checkpoint_classes(metadata, teacher), classes, teacher)
    return Distillation(network.to(device), recipe.distill, recipe.distill_temperature)


def _speed_options(model, place):
    """--channels_last (the weights' layout carries over to every activation) and --compile (torch.compile in
    place, so the state_dict keys stay the same), each refused in one line where it cannot run."""
    if place.channels_last:
        model.to(memory_format=torch.channels_last)
    if not place.compile:
        return
    if not hasattr(model, "compile") or not torch._dynamo.is_dynamo_supported():
        raise UserError(f"--compile is not supported by torch {torch.__version__} on this platform; drop --compile")
    try:
        model.compile()
    except Exception as error:  # e.g. no backend for this device
        raise UserError(f"--compile failed on this machine ({type(error).__name__}: {error}); drop --compile") \
            from None


def _read_last(run_dir, context):
    """The run's last.pth, with the training state a resume needs. A run stopped between its last.pth and its
    best.pth (a full disk) gets best.pth back from last.pth, whose weights were then the best."""
    path = os.path.join(run_dir, "last.pth")
    state = require_resume_state(read_checkpoint(path), path)
    best = os.path.join(run_dir, "best.pth")
    metrics = state.get("metrics") or []
    if context.is_main and not os.path.exists(best) and metrics and metrics[-1]["val_miou"] == state["best_metric"]:
        save_atomic(for_deployment(state), best)
        print(f"restored {best} from last.pth (epoch {state['epoch']}, the best so far): the run stopped before "
              f"writing it")
    return state


def _resume(parts, state, run_dir, context):
    """Optimiser, schedule, scaler and progress from the run's last.pth (the weights came with the model)."""
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["lr_scheduler"])
    if parts.scaler is not None and state.get("scaler"):
        parts.scaler.load_state_dict(state["scaler"])
    if context.is_main:
        print(f"resuming {run_dir} after epoch {state['epoch']} (best val mIoU {100 * state['best_metric']:.2f}%)")
    return Progress(state["epoch"] + 1, state["best_metric"], list(state["metrics"]),
                    state.get("epochs_without_improvement", 0))


def _open_outputs(options, run_dir, context):
    """args.json in the run folder, and the TensorBoard writer when asked for (rank 0 only)."""
    if not context.is_main:
        return None
    os.makedirs(run_dir, exist_ok=True)
    text = json.dumps({**options.flat(), "world_size": context.world_size, "torch": torch.__version__}, indent=2)
    replace_atomically(os.path.join(run_dir, "args.json"), lambda temporary: Path(temporary).write_text(text))
    if not options.place.tensorboard:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(run_dir)


def _train_epoch(parts, context, epoch):
    """One pass over the training split: its mean loss and seconds (utils.engine.train_one_epoch)."""
    if context.enabled:
        parts.loader.sampler.set_epoch(epoch)
    step = TrainStep(parts.criterion, parts.optimizer, parts.scheduler, parts.scaler, parts.amp, parts.amp_dtype,
                     parts.distillation)
    return train_one_epoch(parts.model, parts.loader, step, context.device, epoch, progress=context.is_main)


def _save(parts, options, run_dir, progress, improved, writer):
    """last.pth (then best.pth when improved: a run stopped between the two restores best.pth from last.pth when
    resumed), metrics.csv, curves.png and TensorBoard scalars."""
    row = progress.history[-1]
    checkpoint = make_checkpoint(
        parts.model, parts.arch, parts.classes, pruning=parts.pruning, optimizer=parts.optimizer.state_dict(),
        lr_scheduler=parts.scheduler.state_dict(), scaler=parts.scaler.state_dict() if parts.scaler else None,
        epoch=row["epoch"], best_metric=progress.best, epochs_without_improvement=progress.stale,
        metrics=progress.history, args={**options.flat(), "epochs": progress.epochs})
    save_atomic(checkpoint, os.path.join(run_dir, "last.pth"))
    if improved:  # what deployment needs only: the optimiser state would double or triple the file
        save_atomic(for_deployment(checkpoint), os.path.join(run_dir, "best.pth"))
    write_csv(progress.history, os.path.join(run_dir, "metrics.csv"))
    plot_curves(progress.history, os.path.join(run_dir, "curves.png"), parts.classes.names)
    if writer is not None:
        for key, value in row.items():
            if key != "epoch" and value is not None:
                writer.add_scalar(key, value, row["epoch"])


def _print_epoch(row, epochs, improved):
    crack = f"  crack IoU {100 * row['val_iou_crack']:.2f}%" if "val_iou_crack" in row else ""
    print(f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
          f"val mIoU {100 * row['val_miou']:.2f}%{crack}  data {row['data_seconds']:.1f}s  compute "
          f"{row['compute_seconds']:.1f}s{'  (best)' if improved else ''}", flush=True)
