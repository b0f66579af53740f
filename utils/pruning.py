"""The pruning run behind torchvision_pruning.py: load, prune in steps (Taylor gradients before, fine-tuning
after each), measure, save a pickle-free checkpoint.

A run-floor module (docs/ARCHITECTURE.md): the channel surgery is utils.prune_ops', fine-tuning is
utils.engine's loop with utils.recipe's optimiser and loaders, latency is utils.timing's. MACs and
parameters are those of the deployed network (auxiliary head dropped), as test.py and benchmark.py count.
"""
import copy
import dataclasses
import os
import time
from dataclasses import dataclass

import torch

from utils import data, model as models
from utils.checkpoint import build_from_checkpoint, load_weights, make_checkpoint, read_checkpoint, save_atomic
from utils.cli import UserError, cap_workers, check_batch_memory, plain_name, require_path, resolve_device
from utils.distributed import DistContext
from utils.engine import EvalSettings, TrainStep, evaluate, train_one_epoch
from utils.files import refuse_existing
from utils.metrics import summary_metrics
from utils.prune_ops import (USES_P_VALUE, build_pruner, importance_name, json_history, make_importance,
                             match_pruned_widths, prune_step, ratio_fraction, shapes_differ, slice_extra_outputs,
                             taylor_gradients)
from utils.recipe import build_optimizer, eval_loader, make_criterion, poly_scheduler, seed_everything, train_loader
from utils.report import write_csv
from utils.timing import deployed_latencies


def load_for_pruning(state_dict=None, arch=None, init=None, allow_pickle=False, stride=None):
    """(model, arch, earlier pruning history, source) from --state_dict, or a fresh --arch/--init network.

    Accepts our checkpoints (dense or already pruned: the new history continues the old one), thesis
    state_dicts (8th output dropped) and, behind --allow_pickle, whole pickled models. Files of a pruned
    network without a history get one that reproduces their widths, so --pruning_ratio 0 converts a
    thesis pickle into a pickle-free checkpoint. `stride` overrides the output stride the file records (a new
    network: 8 unless given); pruning and fine-tuning then run at it.
    """
    if state_dict is None:
        if init is None:
            raise UserError("nothing to prune: pass --state_dict W.pth (the trained network), or --init "
                            "coco|imagenet|none to prune an untrained --arch on purpose")
        arch = arch or models.DEFAULT_ARCH
        return models.build(arch, data.NUM_CLASSES, init=init, stride=stride), arch, [], f"--init {init}"
    if init is not None:
        raise UserError("--init and --state_dict contradict each other: the weights come from --state_dict")
    checkpoint = read_checkpoint(state_dict, allow_pickle=allow_pickle)
    if arch and checkpoint["arch"] != arch:
        raise UserError(f"{state_dict} holds a {checkpoint['arch']} network, not --arch {arch}; drop --arch or "
                        f"pass weights of that architecture")
    if checkpoint["num_classes"] != data.NUM_CLASSES:
        raise UserError(f"{state_dict} predicts {checkpoint['num_classes']} classes but S2DS has "
                        f"{data.NUM_CLASSES}; pass weights trained on S2DS")
    model = build_from_checkpoint({**checkpoint, "num_outputs": data.NUM_CLASSES})
    weights = slice_extra_outputs(model, checkpoint["model"], data.NUM_CLASSES)
    history = list(checkpoint.get("pruning") or [])
    if not history and shapes_differ(model, weights):
        history = match_pruned_widths(model, weights)
    load_weights(model, weights, state_dict)
    if stride is not None:
        models.set_output_stride(model, stride)
    return model, checkpoint["arch"], history, str(state_dict)


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


class StepTable:
    """The per-step table: printed as it grows, saved as <model_name>_steps.csv."""

    def __init__(self, path, with_val, with_finetune):
        self.path, self.rows, self.dense = path, [], None
        self.with_val, self.with_finetune = with_val, with_finetune
        header = f"{'step':>4} {'ratio %':>8} {'GMACs':>9} {'% dense':>8} {'params M':>9}"
        if with_val and with_finetune:
            header += f" {'mIoU pruned':>11}"
        if with_val:
            header += f" {'val mIoU':>9}"
        print(header + f" {'seconds':>8}", flush=True)

    def add(self, step, percent, macs, params, seconds, miou=None, miou_pruned=None):
        self.dense = self.dense or macs
        row = {"step": step, "pruning_ratio": percent, "macs": macs, "params": params,
               "macs_percent_of_dense": round(100 * macs / self.dense, 2)}
        line = (f"{step:>4} {percent:>8.1f} {macs / 1e9:>9.2f} {row['macs_percent_of_dense']:>8.1f} "
                f"{params / 1e6:>9.2f}")
        if self.with_val and self.with_finetune:
            row["val_miou_before_finetune"] = miou_pruned
            line += f" {_fmt(None if miou_pruned is None else 100 * miou_pruned):>11}"
        if self.with_val:
            row["val_miou"] = miou
            line += f" {_fmt(100 * miou):>9}"
        row["seconds"] = round(seconds, 2)
        print(line + f" {seconds:>8.1f}", flush=True)
        self.rows.append(row)
        write_csv(self.rows, self.path)


def output_paths(output_dir, model_name):
    """{"checkpoint", "steps", "pickle"}: the files of one pruned network under OUTPUT_DIR/pruned/."""
    folder = os.path.join(output_dir, "pruned")
    name = plain_name(model_name, "--model_name")
    return {"checkpoint": os.path.join(folder, f"{name}.pth"), "steps": os.path.join(folder, f"{name}_steps.csv"),
            "pickle": os.path.join(folder, f"{name}_pickled.pth")}


def default_model_name(arch, importance, p_value, percent):
    norm = f"_l{p_value}" if importance in USES_P_VALUE else ""
    return f"{arch}_{importance.lower()}{norm}_{percent:g}"


def endless_batches(loader):
    """(images, masks) forever: a new shuffled epoch whenever the loader runs out."""
    while True:
        for images, masks, _ in loader:
            yield images, masks


@dataclass(frozen=True)
class PruneOptions:
    """How channels are ranked and removed, and the fine-tuning recipe between steps: what prune_in_steps,
    finetune and prepare_data read, under torchvision_pruning.py's option names (the study builds one per
    (variant, seed); --finetune_epochs here is the fine-tuning after each step). Checked and normalised when made:
    the criterion's canonical spelling, --workers capped at the usable CPUs."""
    importance_type: str
    p_value: int
    pruning_ratio: float | None
    iterative_steps: int
    global_pruning: bool
    round_to: int | None
    finetune_epochs: int
    calib_batches: int
    calib_mode: str
    seed: int
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    workers: int

    def __post_init__(self):
        object.__setattr__(self, "importance_type", importance_name(self.importance_type))
        make_importance(self.importance_type, self.p_value)  # checks --p_value
        if self.pruning_ratio is not None:
            ratio_fraction(self.pruning_ratio)
        at_least(self, iterative_steps=1, calib_batches=1, finetune_epochs=0, workers=0, batch_size=1)
        train_mode = self.finetune_epochs > 0 or (self.importance_type == "Taylor" and self.calib_mode == "train")
        if train_mode and self.batch_size < 2:
            raise UserError(f"--batch_size must be at least 2 for BatchNorm in train mode, got {self.batch_size}")
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"--round_to must be a positive number of channels, got {self.round_to}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        object.__setattr__(self, "workers", cap_workers(self.workers))


def at_least(options, **lowest):
    """One-line UserError for the first option of `options` below its lowest value."""
    for option, bound in lowest.items():
        if getattr(options, option) < bound:
            raise UserError(f"--{option} must be at least {bound}, got {getattr(options, option)}")


@dataclass(frozen=True)
class TuningData:
    """The data of pruning: --data (Taylor gradients, fine-tuning) in --crop_size crops under --loss, --val_data
    (the val mIoU); each optional."""
    data: str | None
    val_data: str | None
    crop_size: int
    loss: str

    def __post_init__(self):
        at_least(self, crop_size=8)


@dataclass(frozen=True)
class PruneRun:
    """torchvision_pruning.py's run: the network to prune, how (`prune`), on what data (`tuning`), what is measured
    and where it goes. Every check that needs no file happens here, when the options are made; `device` is
    resolved (auto becomes cpu or cuda)."""
    prune: PruneOptions
    tuning: TuningData
    state_dict: str | None
    arch: str | None
    init: str | None
    allow_pickle: bool
    output_stride: int | None
    keep_feature_extract: bool
    model_name: str | None
    output_dir: str
    overwrite: bool
    save_pickle: bool
    measure_size: int
    latency_runs: int
    device: str

    def __post_init__(self):
        taylor = self.prune.importance_type == "Taylor"
        needs_data = [reason for reason, on in (("--importance_type Taylor", taylor),
                                                ("--finetune_epochs", self.prune.finetune_epochs > 0)) if on]
        if needs_data and not self.tuning.data:
            raise UserError(f"{needs_data[0]} needs --data TRAIN_DIR: Taylor importance and fine-tuning use the "
                            f"real segmentation loss on training images, never random input")
        if self.prune.pruning_ratio is None:
            raise UserError("--pruning_ratio is required: the percent of channels to remove")
        at_least(self, measure_size=32, latency_runs=0)
        check_batch_memory(self.prune.batch_size, self.tuning.crop_size, "--batch_size x --crop_size")
        if self.model_name is not None:
            plain_name(self.model_name, "--model_name")
        object.__setattr__(self, "device", str(resolve_device(self.device)))

    def flat(self):
        """The options as one flat dict of option names, as the command line gave them (saved in the checkpoint)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        nested = {**dataclasses.asdict(values.pop("prune")), **dataclasses.asdict(values.pop("tuning"))}
        return {**nested, **values}


@dataclass
class PruneData:
    """What the data-driven parts of pruning use: --data (Taylor gradients, fine-tuning) and --val_data."""
    train_set: data.S2DSDataset | None = None
    criterion: torch.nn.Module | None = None
    calibration: object = None
    val_loader: torch.utils.data.DataLoader | None = None


def prepare_data(sources, tuning, context):
    """Datasets, loss and the endless calibration batches from `sources` (a TuningData: --data and --val_data, each
    optional), loaded by `tuning`'s (a PruneOptions) batch size, workers and seed."""
    prepared = PruneData()
    if sources.data:
        prepared.train_set = data.training_set(require_path(sources.data, "--data folder", "dir"), sources.crop_size)
        prepared.criterion = make_criterion(sources.loss, prepared.train_set, progress=True).to(context.device)
        prepared.calibration = endless_batches(train_loader(prepared.train_set, tuning.batch_size, tuning.workers,
                                                            tuning.seed, context))
    if sources.val_data:
        val_set = data.S2DSDataset(require_path(sources.val_data, "--val_data folder", "dir"), data.EvalTransform())
        prepared.val_loader = eval_loader(val_set, 1, tuning.workers, context)
    return prepared


def validation_miou(model, prepared, device):
    """mIoU on --val_data, or None without it."""
    if prepared.val_loader is None:
        return None
    result = evaluate(model, prepared.val_loader, device, EvalSettings(data.NUM_CLASSES))
    return summary_metrics(result.confusion.matrix)["mean_iou"]


def finetune(model, prepared, tuning, context, epochs, seed, on_epoch=None):
    """`epochs` of train.py's loop, optimiser and poly schedule on --data, by `tuning`'s (a PruneOptions) optimizer,
    lr, weight decay, batch size and workers; a fresh optimiser because a pruning step replaces every parameter.
    on_epoch(epoch) after each epoch."""
    optimizer = build_optimizer(model, tuning.optimizer, tuning.lr, tuning.weight_decay)
    loader = train_loader(prepared.train_set, tuning.batch_size, tuning.workers, seed, context)
    scheduler = poly_scheduler(optimizer, epochs * len(loader))
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, loader, TrainStep(prepared.criterion, optimizer, scheduler), context.device, epoch)
        if on_epoch is not None:
            on_epoch(epoch)


def prune_in_steps(model, options, prepared, context, on_step, ignored_layers=()):
    """Reach `options`' (a PruneOptions) --pruning_ratio in --iterative_steps steps (Taylor gradients before,
    fine-tuning after each); on_step(step, percent, seconds, miou_before_finetune) after every step. Returns the
    pruning history.

    A step that removes no channel is an error: frozen or ignored layers would otherwise pass silently.
    ignored_layers are left whole (the study's sensitivity prunes one part at a time).
    """
    kind = options.importance_type
    pruner = build_pruner(model, make_importance(kind, options.p_value, options.seed),
                          ratio_fraction(options.pruning_ratio), options.iterative_steps, options.global_pruning,
                          options.round_to, ignored_layers)

    def gradients():
        batches = [next(prepared.calibration) for _ in range(options.calib_batches)]
        taylor_gradients(model, batches, prepared.criterion, context.device, train_mode=options.calib_mode == "train")

    for step in range(1, options.iterative_steps + 1):
        started, before = time.perf_counter(), models.count_parameters(model)
        prune_step(pruner, model, gradients if kind == "Taylor" else None)
        if options.pruning_ratio > 0 and models.count_parameters(model) == before:
            raise UserError(f"pruning step {step} removed no channel ({kind}, {options.pruning_ratio:g}%): nothing in "
                            f"the network could be pruned; check --round_to and the layers left to prune")
        miou_pruned = validation_miou(model, prepared, context.device) if options.finetune_epochs else None
        if options.finetune_epochs:
            finetune(model, prepared, options, context, options.finetune_epochs, options.seed + step)
        on_step(step, round(100 * pruner.per_step_pruning_ratio[step], 2), time.perf_counter() - started,
                miou_pruned)
    return json_history(pruner.pruning_history())


def run(options):
    """Load, prune in --iterative_steps, score, time dense against pruned, save. `options` is a PruneRun."""
    tuning, context = options.prune, DistContext(device=torch.device(options.device))
    kind = tuning.importance_type
    seed_everything(tuning.seed)
    model, arch, earlier_history, source = load_for_pruning(options.state_dict, options.arch, options.init,
                                                            options.allow_pickle, options.output_stride)
    paths = output_paths(options.output_dir, options.model_name or
                         default_model_name(arch, kind, tuning.p_value, tuning.pruning_ratio))
    # The steps table is written as the steps go: one without its checkpoint is a failed run's, replaced.
    refuse_existing([paths["checkpoint"]] + ([paths["pickle"]] if options.save_pickle else []),
                    options.overwrite, "choose another --model_name")
    if options.keep_feature_extract:
        models.freeze_all_but_head(model)
    model.to(context.device)
    prepared = prepare_data(options.tuning, tuning, context)
    print(f"pruning {arch} from {source}: {tuning.pruning_ratio:g}% of channels by {kind} importance"
          f"{f' (p={tuning.p_value})' if kind in USES_P_VALUE else ''} in {tuning.iterative_steps} step(s)"
          f"{f', {tuning.finetune_epochs} fine-tuning epoch(s) after each' if tuning.finetune_epochs else ''}",
          flush=True)
    started = time.perf_counter()
    dense = copy.deepcopy(model)  # measured beside the pruned one at the end
    table = StepTable(paths["steps"], prepared.val_loader is not None, tuning.finetune_epochs > 0)
    table.add(0, 0.0, *models.count_macs(model, options.measure_size, context.device),
              time.perf_counter() - started, validation_miou(model, prepared, context.device))

    def on_step(step, percent, seconds, miou_pruned):
        macs, params = models.count_macs(model, options.measure_size, context.device)
        table.add(step, percent, macs, params, seconds, validation_miou(model, prepared, context.device), miou_pruned)

    history = earlier_history + prune_in_steps(model, tuning, prepared, context, on_step)
    facts = _measure(dense, model, options, context.device)
    del dense
    extras = {"pruning_ratio": tuning.pruning_ratio, "importance": kind, "p_value": tuning.p_value,
              "iterative_steps": tuning.iterative_steps, "finetune_epochs": tuning.finetune_epochs,
              "global_pruning": tuning.global_pruning, "round_to": tuning.round_to, "source": source,
              "measure_size": options.measure_size, **facts, "steps": table.rows, "args": options.flat()}
    _save(model, arch, history, extras, paths, options.save_pickle)
    print(final_line(facts, options.measure_size, context.device), flush=True)
    return paths["checkpoint"]


def _measure(dense, pruned, options, device):
    """MACs and parameters of the deployed networks (aux head dropped), and their latency as utils.timing measures
    every latency (BatchNorm folded, warm-up, median of interleaved rounds)."""
    facts = {}
    for prefix, network in (("dense_", dense), ("", pruned)):
        facts[f"{prefix}macs"], facts[f"{prefix}params"] = models.count_macs(network, options.measure_size, device)
    facts["dense_latency_seconds"] = facts["latency_seconds"] = None
    if options.latency_runs:
        facts["dense_latency_seconds"], facts["latency_seconds"] = deployed_latencies(
            [dense, pruned], options.measure_size, device, options.latency_runs)
    return facts


def _save(model, arch, history, extras, paths, save_pickle):
    save_atomic(make_checkpoint(model, arch, pruning=history, **extras), paths["checkpoint"])
    saved = [paths["checkpoint"], paths["steps"]]
    if save_pickle:
        save_atomic(model.cpu(), paths["pickle"])
        saved.append(paths["pickle"])
    print(f"saved {', '.join(saved)}")


def final_line(facts, size, device):
    """'dense ... -> pruned ...' with the reductions, the line people quote."""
    dense_macs, macs, dense_params, params = (facts[key] for key in ("dense_macs", "macs", "dense_params", "params"))
    line = (f"dense {dense_macs / 1e9:.1f} GMACs, {dense_params / 1e6:.1f} M params -> pruned {macs / 1e9:.1f} GMACs "
            f"({100 * macs / dense_macs:.1f}%, {dense_macs / macs:.2f}x fewer), {params / 1e6:.1f} M params "
            f"({100 * params / dense_params:.1f}%) at {size}x{size} (deployed network, aux head dropped)")
    if facts["latency_seconds"] is not None:
        dense_latency, latency = facts["dense_latency_seconds"], facts["latency_seconds"]
        line += (f"; latency {1000 * dense_latency:.1f} -> {1000 * latency:.1f} ms ({dense_latency / latency:.2f}x "
                 f"faster; deployed: BatchNorm folded, median of interleaved rounds, batch 1, "
                 f"{torch.device(device).type})")
    return line
