"""The pruning run behind torchvision_pruning.py: load, prune in steps (Taylor gradients before, fine-tuning
after each), measure, save a pickle-free checkpoint.

A run-floor module (docs/ARCHITECTURE.md): the channel surgery is utils.prune_ops', fine-tuning is
utils.engine's loop with utils.recipe's optimiser and loaders, latency is utils.timing's. MACs and
parameters are those of the deployed network (auxiliary head dropped), as test.py and benchmark.py count.
"""
import copy
import os
import time
from dataclasses import dataclass

import torch

from utils import data, model as models
from utils.checkpoint import build_from_checkpoint, load_weights, make_checkpoint, read_checkpoint, save_atomic
from utils.cli import UserError, plain_name, require_path
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


@dataclass
class PruneData:
    """What the data-driven parts of pruning use: --data (Taylor gradients, fine-tuning) and --val_data."""
    train_set: data.S2DSDataset | None = None
    criterion: torch.nn.Module | None = None
    calibration: object = None
    val_loader: torch.utils.data.DataLoader | None = None


def prepare_data(args, context):
    """Datasets, loss and the endless calibration batches from --data/--val_data (each optional)."""
    prepared = PruneData()
    if args.data:
        prepared.train_set = data.training_set(require_path(args.data, "--data folder", "dir"), args.crop_size)
        prepared.criterion = make_criterion(args.loss, prepared.train_set, progress=True).to(context.device)
        prepared.calibration = endless_batches(train_loader(prepared.train_set, args.batch_size, args.workers,
                                                            args.seed, context))
    if args.val_data:
        val_set = data.S2DSDataset(require_path(args.val_data, "--val_data folder", "dir"), data.EvalTransform())
        prepared.val_loader = eval_loader(val_set, 1, args.workers, context)
    return prepared


def validation_miou(model, prepared, device):
    """mIoU on --val_data, or None without it."""
    if prepared.val_loader is None:
        return None
    return summary_metrics(evaluate(model, prepared.val_loader, device, EvalSettings(data.NUM_CLASSES)).confusion.matrix)["mean_iou"]


def finetune(model, prepared, args, context, epochs, seed, on_epoch=None):
    """`epochs` of train.py's loop, optimiser and poly schedule on --data; a fresh optimiser because a pruning
    step replaces every parameter. on_epoch(epoch) after each epoch."""
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    loader = train_loader(prepared.train_set, args.batch_size, args.workers, seed, context)
    scheduler = poly_scheduler(optimizer, epochs * len(loader))
    for epoch in range(1, epochs + 1):
        train_one_epoch(model, loader, TrainStep(prepared.criterion, optimizer, scheduler), context.device, epoch)
        if on_epoch is not None:
            on_epoch(epoch)


def prune_in_steps(model, args, prepared, context, on_step, ignored_layers=()):
    """Reach --pruning_ratio in --iterative_steps steps (Taylor gradients before, fine-tuning after each);
    on_step(step, percent, seconds, miou_before_finetune) after every step. Returns the pruning history.

    A step that removes no channel is an error: frozen or ignored layers would otherwise pass silently.
    ignored_layers are left whole (the study's sensitivity prunes one part at a time).
    """
    kind = importance_name(args.importance_type)
    pruner = build_pruner(model, make_importance(kind, args.p_value, args.seed),
                          ratio_fraction(args.pruning_ratio), args.iterative_steps, args.global_pruning,
                          args.round_to, ignored_layers)

    def gradients():
        batches = [next(prepared.calibration) for _ in range(args.calib_batches)]
        taylor_gradients(model, batches, prepared.criterion, context.device, train_mode=args.calib_mode == "train")

    for step in range(1, args.iterative_steps + 1):
        started, before = time.perf_counter(), models.count_parameters(model)
        prune_step(pruner, model, gradients if kind == "Taylor" else None)
        if args.pruning_ratio > 0 and models.count_parameters(model) == before:
            raise UserError(f"pruning step {step} removed no channel ({kind}, {args.pruning_ratio:g}%): nothing in "
                            f"the network could be pruned; check --round_to and the layers left to prune")
        miou_pruned = validation_miou(model, prepared, context.device) if args.finetune_epochs else None
        if args.finetune_epochs:
            finetune(model, prepared, args, context, args.finetune_epochs, args.seed + step)
        on_step(step, round(100 * pruner.per_step_pruning_ratio[step], 2), time.perf_counter() - started,
                miou_pruned)
    return json_history(pruner.pruning_history())


def run(args):
    """Load, prune in --iterative_steps, score, time dense against pruned, save."""
    kind = importance_name(args.importance_type)
    make_importance(kind, args.p_value)
    ratio_fraction(args.pruning_ratio)
    context = DistContext(device=torch.device(args.device))
    seed_everything(args.seed)
    model, arch, earlier_history, source = load_for_pruning(args.state_dict, args.arch, args.init,
                                                            args.allow_pickle, args.output_stride)
    paths = output_paths(args.output_dir,
                         args.model_name or default_model_name(arch, kind, args.p_value, args.pruning_ratio))
    # The steps table is written as the steps go: one without its checkpoint is a failed run's, replaced.
    refuse_existing([paths["checkpoint"]] + ([paths["pickle"]] if args.save_pickle else []),
                    args.overwrite, "choose another --model_name")
    if args.keep_feature_extract:
        models.freeze_all_but_head(model)
    model.to(context.device)
    prepared = prepare_data(args, context)
    print(f"pruning {arch} from {source}: {args.pruning_ratio:g}% of channels by {kind} importance"
          f"{f' (p={args.p_value})' if kind in USES_P_VALUE else ''} in {args.iterative_steps} step(s)"
          f"{f', {args.finetune_epochs} fine-tuning epoch(s) after each' if args.finetune_epochs else ''}",
          flush=True)
    started = time.perf_counter()
    dense = copy.deepcopy(model)  # measured beside the pruned one at the end
    table = StepTable(paths["steps"], prepared.val_loader is not None, args.finetune_epochs > 0)
    table.add(0, 0.0, *models.count_macs(model, args.measure_size, context.device), time.perf_counter() - started,
              validation_miou(model, prepared, context.device))

    def on_step(step, percent, seconds, miou_pruned):
        macs, params = models.count_macs(model, args.measure_size, context.device)
        table.add(step, percent, macs, params, seconds, validation_miou(model, prepared, context.device), miou_pruned)

    history = earlier_history + prune_in_steps(model, args, prepared, context, on_step)
    facts = _measure(dense, model, args, context.device)
    del dense
    extras = {"pruning_ratio": args.pruning_ratio, "importance": kind, "p_value": args.p_value,
              "iterative_steps": args.iterative_steps, "finetune_epochs": args.finetune_epochs,
              "global_pruning": args.global_pruning, "round_to": args.round_to, "source": source,
              "measure_size": args.measure_size, **facts, "steps": table.rows, "args": dict(vars(args))}
    _save(model, arch, history, extras, paths, args.save_pickle)
    print(final_line(facts, args.measure_size, context.device), flush=True)
    return paths["checkpoint"]


def _measure(dense, pruned, args, device):
    """MACs and parameters of the deployed networks (aux head dropped), and their latency as utils.timing measures
    every latency (BatchNorm folded, warm-up, median of interleaved rounds)."""
    facts = {}
    for prefix, network in (("dense_", dense), ("", pruned)):
        facts[f"{prefix}macs"], facts[f"{prefix}params"] = models.count_macs(network, args.measure_size, device)
    facts["dense_latency_seconds"] = facts["latency_seconds"] = None
    if args.latency_runs:
        facts["dense_latency_seconds"], facts["latency_seconds"] = deployed_latencies(
            [dense, pruned], args.measure_size, device, args.latency_runs)
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
