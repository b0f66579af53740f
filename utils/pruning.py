"""torch-pruning wrappers: importance, pruner, and the pruning history that makes checkpoints pickle-free.

Also the iterative prune / calibrate / fine-tune / score loop behind torchvision_pruning.py, built
from utils/engine.py and utils/training.py so no training loop is written twice.
"""
import copy
import os
import statistics
import time
from contextlib import contextmanager

import torch
import torch_pruning as tp

from utils import data, model as models
from utils.checkpoint import build_from_checkpoint, load_weights, make_checkpoint, read_checkpoint, save_atomic
from utils.cli import UserError, percent_or_fraction_hint, require_path
from utils.distributed import DistContext
from utils.engine import evaluate, train_one_epoch
from utils.metrics import summary_metrics
from utils.report import write_csv
from utils.training import build_optimizer, eval_loader, make_criterion, poly_scheduler, seed_everything, train_loader

EXAMPLE_SIZE = 64
# --importance_type choices: the seed's two, plus torch-pruning's criteria that need nothing but the weights.
IMPORTANCES = ("Magnitude", "Taylor", "LAMP", "BNScale", "FPGM")
USES_P_VALUE = ("Magnitude", "LAMP", "FPGM")


def example_inputs(size=EXAMPLE_SIZE, device="cpu"):
    """A small input for tracing: the dependency graph does not depend on the spatial size."""
    return torch.randn(1, 3, size, size, device=device)


def replay_pruning_history(model, history):
    """Rebuild a pruned network: trace the dense model, then redo each recorded channel removal."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(device=device),
                                                  verbose=False)
    graph.load_pruning_history([(name, bool(out), list(idx)) for name, out, idx in history])
    model.train(was_training)
    return model


def json_history(history):
    """torch-pruning's history as plain lists of str/bool/int, so torch.load(weights_only=True) reads it."""
    return [[str(name), bool(out), [int(i) for i in idx]] for name, out, idx in history]


def importance_name(name):
    """The canonical spelling of an --importance_type (any case accepted)."""
    by_lower = {choice.lower(): choice for choice in IMPORTANCES}
    if str(name).lower() not in by_lower:
        raise UserError(f"unknown --importance_type {name!r}; choose one of {', '.join(IMPORTANCES)}")
    return by_lower[str(name).lower()]


def make_importance(name, p_value=2):
    """A torch-pruning importance criterion; p_value is the norm of the magnitude-based ones (1 = L1, 2 = L2)."""
    name = importance_name(name)
    if isinstance(p_value, bool) or not isinstance(p_value, int) or p_value < 1:
        raise UserError(f"--p_value must be a positive integer (1 = L1, 2 = L2), got {p_value}")
    if name == "Magnitude":
        return tp.importance.GroupMagnitudeImportance(p=p_value)
    if name == "Taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "LAMP":
        return tp.importance.LAMPImportance(p=p_value)
    if name == "FPGM":
        return tp.importance.FPGMImportance(p=p_value)
    return tp.importance.BNScaleImportance()


def ratio_fraction(percent):
    """--pruning_ratio (percent of channels removed, 0 to 99) as torch-pruning's fraction."""
    if not 0 <= percent <= 99:
        raise UserError(f"--pruning_ratio must be between 0 and 99 (percent of channels removed), got {percent:g}")
    if 0 < percent < 1:
        raise UserError(f"--pruning_ratio {percent_or_fraction_hint(percent)}; use 0 to prune nothing")
    return percent / 100


def build_pruner(model, importance, ratio, iterative_steps=1, global_pruning=False, round_to=None):
    """A torch-pruning pruner that never touches the class-producing convolutions.

    Tracing runs in eval mode (a batch of 1 cannot pass the ASPP pooling BatchNorm in train mode);
    the model's mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pruner = tp.pruner.BasePruner(
        model, example_inputs(device=device), importance, pruning_ratio=ratio, iterative_steps=iterative_steps,
        ignored_layers=models.head_layers(model), global_pruning=global_pruning,
        round_to=round_to if round_to and round_to > 1 else None)
    model.train(was_training)
    return pruner


def trainable_flags(model):
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


def prune_step(pruner, model, compute_gradients=None):
    """One pruner step. Taylor's gradients are computed first; torch-pruning's fresh Parameters would
    all be trainable, so the frozen/trainable flags are put back by name, and gradients cleared."""
    flags = trainable_flags(model)
    if compute_gradients is not None:
        compute_gradients()
    pruner.step()
    model.zero_grad(set_to_none=True)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name, True))


@contextmanager
def _buffers_restored(model):
    """Batch statistics without side effects: BatchNorm running statistics are put back afterwards."""
    saved = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(saved[name])


def taylor_gradients(model, batches, criterion, device, train_mode=False):
    """Accumulate gradients of the real segmentation loss over `batches` for Taylor importance.

    Eval mode (default) keeps BatchNorm on its running statistics, as deployed. In train mode a
    BatchNorm after a convolution makes the loss blind to the scale of that convolution's channels, so
    per channel sum(w * dL/dw) is exactly 0 and the ranking loses its signal (batch >= 2 needed there).
    Every parameter gets a gradient (frozen ones included, so the whole network is ranked); weights,
    BatchNorm statistics and trainable flags are left as they were.
    """
    was_training, flags = model.training, trainable_flags(model)
    model.train(train_mode)
    model.zero_grad(set_to_none=True)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    with _buffers_restored(model), torch.enable_grad():
        for images, masks in batches:
            loss = criterion(model(images.to(device)), masks.to(device)) / len(batches)
            loss.backward()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags[name])
    model.train(was_training)


def calibration_batches(loader):
    """(images, masks) forever: a new shuffled epoch whenever the loader runs out."""
    while True:
        for images, masks, _ in loader:
            yield images, masks


@torch.inference_mode()
def _forward_times(model, size, runs, device, warmup):
    """Seconds of `runs` forward passes of a batch-1 size x size image, after `warmup` untimed ones."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    image = torch.randn(1, 3, size, size, device=device)
    times = []
    for index in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        model(image)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    model.train(was_training)
    return times


def interleaved_latencies(networks, size=512, runs=5, device="cpu"):
    """Per network, `runs` forward times (seconds) taken in rounds (dense, pruned, dense, ...) so that a
    busy machine slows every network alike instead of whichever ran during the busy spell."""
    for network in networks:
        _forward_times(network, size, 0, device, warmup=1)
    times = [[] for _ in networks]
    for _ in range(runs):
        for network, seconds in zip(networks, times):
            seconds.extend(_forward_times(network, size, 1, device, warmup=0))
    return times


def _slice_extra_outputs(model, state_dict, num_classes):
    """Drop the thesis' 8th "boundary" output from the head weights so the pruned file is a plain 7-class one
    (forward_logits drops that channel at prediction anyway)."""
    names = {id(module): name for name, module in model.named_modules()}
    state_dict = dict(state_dict)
    for layer in models.head_layers(model):
        for suffix in ("weight", "bias"):
            key = f"{names[id(layer)]}.{suffix}"
            if key in state_dict and state_dict[key].shape[0] > num_classes:
                state_dict[key] = state_dict[key][:num_classes]
    return state_dict


def match_pruned_widths(model, state_dict):
    """Prune a dense network down to the channel counts of a pruned state_dict that has no history
    (a thesis pickle or its state_dict); returns the history that rebuilds those widths.

    Which channels go does not matter: the file's weights are loaded afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs(device=device),
                                                  verbose=False)
    for name, module in model.named_modules():
        weight = state_dict.get(f"{name}.weight")
        if isinstance(module, torch.nn.Conv2d) and weight is not None and weight.shape[0] < module.out_channels:
            surplus = list(range(weight.shape[0], module.out_channels))
            graph.get_pruning_group(module, tp.prune_conv_out_channels, surplus).prune()
    model.train(was_training)
    return json_history(graph.pruning_history())


def _shapes_differ(model, state_dict):
    own = model.state_dict()
    return any(key in own and own[key].shape != value.shape for key, value in state_dict.items())


def load_for_pruning(state_dict=None, arch=None, init=None, allow_pickle=False):
    """(model, arch, earlier pruning history, source) from --state_dict, or a fresh --arch/--init network.

    Accepts our checkpoints (dense or already pruned: the new history continues the old one), thesis
    state_dicts (8th output dropped) and, behind --allow_pickle, whole pickled models. Files of a pruned
    network without a history get one that reproduces their widths, so --pruning_ratio 0 converts a
    thesis pickle into a pickle-free checkpoint.
    """
    if state_dict is None:
        if init is None:
            raise UserError("nothing to prune: pass --state_dict W.pth (the trained network), or --init "
                            "coco|imagenet|none to prune an untrained --arch on purpose")
        arch = arch or models.DEFAULT_ARCH
        return models.build(arch, data.NUM_CLASSES, init=init), arch, [], f"--init {init}"
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
    weights = _slice_extra_outputs(model, checkpoint["model"], data.NUM_CLASSES)
    history = list(checkpoint.get("pruning") or [])
    if not history and _shapes_differ(model, weights):
        history = match_pruned_widths(model, weights)
    load_weights(model, weights, state_dict)
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
    folder = os.path.join(output_dir, "pruned")
    return {"checkpoint": os.path.join(folder, f"{model_name}.pth"),
            "steps": os.path.join(folder, f"{model_name}_steps.csv"),
            "pickle": os.path.join(folder, f"{model_name}_pickled.pth")}


def default_model_name(arch, importance, p_value, percent):
    norm = f"_l{p_value}" if importance in USES_P_VALUE else ""
    return f"{arch}_{importance.lower()}{norm}_{percent:g}"


def _refuse_existing(paths, save_pickle, overwrite):
    wanted = [paths["checkpoint"], paths["steps"]] + ([paths["pickle"]] if save_pickle else [])
    existing = [path for path in wanted if os.path.exists(path)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another "
                        f"--model_name")


def _finetune(model, train_set, criterion, args, context, step):
    """--finetune_epochs on --data with train.py's optimiser, poly schedule and loop; a fresh optimiser
    because the pruning step replaced every parameter."""
    optimizer = build_optimizer(model, args.optimizer, args.lr, args.weight_decay)
    loader = train_loader(train_set, args.batch_size, args.workers, args.seed + step, context)
    scheduler = poly_scheduler(optimizer, args.finetune_epochs * len(loader))
    for epoch in range(1, args.finetune_epochs + 1):
        train_one_epoch(model, loader, criterion, optimizer, context.device, epoch, scheduler)


def run(args):
    """Load, prune in --iterative_steps (Taylor gradients before, fine-tuning after each), score, save."""
    importance = make_importance(args.importance_type, args.p_value)
    ratio = ratio_fraction(args.pruning_ratio)
    kind = importance_name(args.importance_type)
    device = torch.device(args.device)
    context = DistContext(device=device)
    seed_everything(args.seed)

    model, arch, earlier_history, source = load_for_pruning(args.state_dict, args.arch, args.init,
                                                            args.allow_pickle)
    paths = output_paths(args.output_dir,
                         args.model_name or default_model_name(arch, kind, args.p_value, args.pruning_ratio))
    _refuse_existing(paths, args.save_pickle, args.overwrite)
    if args.keep_feature_extract:
        models.freeze_all_but_head(model)
    model.to(device)

    train_set = val_loader = criterion = calibration = None
    if args.data:
        train_set = data.S2DSDataset(require_path(args.data, "--data folder", "dir"),
                                     data.train_transform(args.crop_size))
        criterion = make_criterion(args.loss, train_set, progress=True).to(device)
        calibration = calibration_batches(train_loader(train_set, args.batch_size, args.workers, args.seed,
                                                       context))
    if args.val_data:
        val_set = data.S2DSDataset(require_path(args.val_data, "--val_data folder", "dir"), data.EvalTransform())
        val_loader = eval_loader(val_set, 1, args.workers, context)

    def score():
        if val_loader is None:
            return None
        return summary_metrics(evaluate(model, val_loader, device, data.NUM_CLASSES).confusion.matrix)["mean_iou"]

    def gradients():
        taylor_gradients(model, [next(calibration) for _ in range(args.calib_batches)], criterion, device,
                         train_mode=args.calib_mode == "train")

    started = time.perf_counter()
    print(f"pruning {arch} from {source}: {args.pruning_ratio:g}% of channels by {kind} importance"
          f"{f' (p={args.p_value})' if kind in USES_P_VALUE else ''} in {args.iterative_steps} step(s)"
          f"{f', {args.finetune_epochs} fine-tuning epoch(s) after each' if args.finetune_epochs else ''}",
          flush=True)
    dense_macs, dense_params = models.count_macs(model, args.measure_size, device)
    dense = copy.deepcopy(model) if args.latency_runs else None  # timed beside the pruned one at the end
    table = StepTable(paths["steps"], val_loader is not None, args.finetune_epochs > 0)
    table.add(0, 0.0, dense_macs, dense_params, time.perf_counter() - started, score())

    pruner = build_pruner(model, importance, ratio, args.iterative_steps, args.global_pruning, args.round_to)
    for step in range(1, args.iterative_steps + 1):
        started = time.perf_counter()
        prune_step(pruner, model, gradients if kind == "Taylor" else None)
        miou_pruned = score() if args.finetune_epochs else None
        if args.finetune_epochs:
            _finetune(model, train_set, criterion, args, context, step)
        macs, params = models.count_macs(model, args.measure_size, device)
        table.add(step, round(100 * pruner.per_step_pruning_ratio[step], 2), macs, params,
                  time.perf_counter() - started, score(), miou_pruned)

    dense_latency = latency = None
    if args.latency_runs:
        dense_latency, latency = (statistics.median(times) for times in interleaved_latencies(
            [dense, model], args.measure_size, args.latency_runs, device))
        del dense
    extras = {"pruning_ratio": args.pruning_ratio, "importance": kind, "p_value": args.p_value,
              "iterative_steps": args.iterative_steps, "finetune_epochs": args.finetune_epochs,
              "global_pruning": args.global_pruning, "round_to": args.round_to, "source": source,
              "measure_size": args.measure_size, "macs": macs, "params": params, "dense_macs": dense_macs,
              "dense_params": dense_params, "latency_seconds": latency, "dense_latency_seconds": dense_latency,
              "steps": table.rows, "args": dict(vars(args))}
    history = earlier_history + json_history(pruner.pruning_history())
    save_atomic(make_checkpoint(model, arch, pruning=history, **extras), paths["checkpoint"])
    saved = [paths["checkpoint"], paths["steps"]]
    if args.save_pickle:
        save_atomic(model.cpu(), paths["pickle"])
        saved.append(paths["pickle"])
    print(f"saved {', '.join(saved)}")
    print(final_line(dense_macs, macs, dense_params, params, dense_latency, latency, args.measure_size, device),
          flush=True)
    return paths["checkpoint"]


def final_line(dense_macs, macs, dense_params, params, dense_latency, latency, size, device):
    """'dense ... -> pruned ...' with the reductions, the line people quote."""
    line = (f"dense {dense_macs / 1e9:.1f} GMACs, {dense_params / 1e6:.1f} M params -> pruned {macs / 1e9:.1f} GMACs "
            f"({100 * macs / dense_macs:.1f}%, {dense_macs / macs:.2f}x fewer), {params / 1e6:.1f} M params "
            f"({100 * params / dense_params:.1f}%) at {size}x{size}")
    if latency is not None:
        line += (f"; latency {1000 * dense_latency:.1f} -> {1000 * latency:.1f} ms "
                 f"({dense_latency / latency:.2f}x faster, median, batch 1, {torch.device(device).type})")
    return line
