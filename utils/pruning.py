"""The pruning run behind torchvision_pruning.py: load, prune in steps (Taylor gradients before, fine-tuning
after each), measure, save a pickle-free checkpoint.

A run-floor module (docs/ARCHITECTURE.md): the channel surgery is utils.prune_ops', fine-tuning is
utils.engine's loop with utils.recipe's optimiser and loaders, latency is utils.timing's. MACs and
parameters are those of the deployed network (auxiliary head dropped), as test.py and benchmark.py count.
"""
import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from utils import data, model as models
from utils.checkpoint import (build_from_checkpoint, checkpoint_classes, load_weights, make_checkpoint, read_checkpoint,
                              save_atomic)
from utils.cli import UserError, cap_workers, check_batch_memory, plain_name, require_path, resolve_device
from utils.distributed import DistContext
from utils.engine import EvalSettings, TrainStep, evaluate, train_one_epoch
from utils.files import refuse_existing, replace_atomically
from utils.metrics import summary_metrics
from utils.prune_ops import (USES_P_VALUE, build_pruner, importance_name, json_history, make_importance,
                             match_pruned_widths, network_parts, prune_step, ratio_fraction, shapes_differ,
                             slice_extra_outputs, taylor_gradients)
from utils.recipe import build_optimizer, eval_loader, make_criterion, poly_scheduler, seed_everything, train_loader
from utils.report import write_csv
from utils.timing import ROUNDS, deployed_latencies


def load_for_pruning(state_dict=None, arch=None, init=None, allow_pickle=False, stride=None):
    """(model, arch, earlier pruning history, source, classes) from --state_dict (classes: its ClassTable), or a
    fresh --arch/--init network (S2DS's classes).

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
        network = models.build(arch, data.S2DS_CLASSES.num_classes, init=init, stride=stride)
        return network, arch, [], f"--init {init}", data.S2DS_CLASSES
    if init is not None:
        raise UserError("--init and --state_dict contradict each other: the weights come from --state_dict")
    checkpoint = read_checkpoint(state_dict, allow_pickle=allow_pickle)
    if arch and checkpoint["arch"] != arch:
        raise UserError(f"{state_dict} holds a {checkpoint['arch']} network, not --arch {arch}; drop --arch or "
                        f"pass weights of that architecture")
    classes = checkpoint_classes(checkpoint, state_dict)
    model = build_from_checkpoint({**checkpoint, "num_outputs": classes.num_classes})
    weights = slice_extra_outputs(model, checkpoint["model"], classes.num_classes)
    history = list(checkpoint.get("pruning") or [])
    if not history and shapes_differ(model, weights):
        history = match_pruned_widths(model, weights)
    load_weights(model, weights, state_dict)
    if stride is not None:
        models.set_output_stride(model, stride)
    return model, checkpoint["arch"], history, str(state_dict), classes


def _fmt(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


class StepTable:
    """The per-step table: printed as it grows, saved as <model_name>_steps.csv (ratio empty under a per-part plan,
    where each part has its own)."""

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
        line = (f"{step:>4} {_fmt(percent, 1):>8} {macs / 1e9:>9.2f} {row['macs_percent_of_dense']:>8.1f} "
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
    """{"checkpoint", "steps", "pickle", "plan"}: the files of one pruned network under OUTPUT_DIR/pruned/."""
    folder = os.path.join(output_dir, "pruned")
    name = plain_name(model_name, "--model_name")
    return {"checkpoint": os.path.join(folder, f"{name}.pth"), "steps": os.path.join(folder, f"{name}_steps.csv"),
            "pickle": os.path.join(folder, f"{name}_pickled.pth"), "plan": os.path.join(folder, f"{name}_plan.json")}


def default_model_name(arch, importance, p_value, amount):
    """arch_criterion[_lP]_AMOUNT, AMOUNT the percent removed or the budget ('4.5gmacs', '50ms', 'plan')."""
    norm = f"_l{p_value}" if importance in USES_P_VALUE else ""
    amount = f"{amount:g}" if isinstance(amount, (int, float)) else amount
    return f"{arch}_{importance.lower()}{norm}_{amount}"


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
    target_gmacs: float | None = None
    target_latency_ms: float | None = None
    plan: str | None = None

    def __post_init__(self):
        self._check_amount()
        taylor = self.prune.importance_type == "Taylor"
        needs_data = [reason for reason, on in (("--importance_type Taylor", taylor),
                                                ("--finetune_epochs", self.prune.finetune_epochs > 0)) if on]
        if needs_data and not self.tuning.data:
            raise UserError(f"{needs_data[0]} needs --data TRAIN_DIR: Taylor importance and fine-tuning use the "
                            f"real segmentation loss on training images, never random input")
        at_least(self, measure_size=32, latency_runs=0)
        check_batch_memory(self.prune.batch_size, self.tuning.crop_size, "--batch_size x --crop_size")
        if self.model_name is not None:
            plain_name(self.model_name, "--model_name")
        object.__setattr__(self, "device", str(resolve_device(self.device)))

    def _check_amount(self):
        """Exactly one of --pruning_ratio, --target_gmacs, --target_latency_ms and --plan says how much to prune."""
        given = [option for option, value in (("--pruning_ratio", self.prune.pruning_ratio),
                                               ("--target_gmacs", self.target_gmacs),
                                               ("--target_latency_ms", self.target_latency_ms),
                                               ("--plan", self.plan)) if value is not None]
        if not given:
            raise UserError("say how much to prune: --pruning_ratio PERCENT (every layer alike), --target_gmacs G or "
                            "--target_latency_ms T (per-part ratios chosen to meet a budget), or --plan FILE")
        if len(given) > 1:
            raise UserError(f"{given[0]} and {given[1]} contradict each other: give one of --pruning_ratio, "
                            f"--target_gmacs, --target_latency_ms and --plan")
        budget = self.budget_option
        if budget and not 0 < getattr(self, budget[2:]) < math.inf:  # NaN too
            raise UserError(f"{budget} must be positive, got {getattr(self, budget[2:]):g}")
        if budget and not self.tuning.val_data:
            raise UserError(f"{budget} chooses each part's ratio by the val mIoU it costs and needs --val_data "
                            f"VAL_DIR")
        if given[0] != "--pruning_ratio" and self.prune.global_pruning:
            raise UserError(f"{given[0]} prunes each part by its own ratio, which --global_pruning's ranking across "
                            f"the whole network would override; drop --global_pruning")

    @property
    def budget_option(self):
        """'--target_gmacs' or '--target_latency_ms' when pruning to a budget, else None."""
        return ("--target_gmacs" if self.target_gmacs is not None else
                "--target_latency_ms" if self.target_latency_ms is not None else None)

    @property
    def timing_runs(self):
        """--latency_runs; a latency budget is always measured (utils.timing's rounds when --latency_runs is 0)."""
        return self.latency_runs or (ROUNDS if self.target_latency_ms is not None else 0)

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


def require_classes(prepared, classes, source):
    """Refuse --data/--val_data whose class table is not the network's (ClassTable `classes`): fine-tuning and
    scores would mean other classes."""
    splits = [prepared.train_set, prepared.val_loader.dataset if prepared.val_loader is not None else None]
    for split in (split for split in splits if split is not None):
        data.require_same_classes(classes, split, source)


def validation_miou(model, prepared, device):
    """mIoU on --val_data, or None without it."""
    if prepared.val_loader is None:
        return None
    classes = prepared.val_loader.dataset.classes
    result = evaluate(model, prepared.val_loader, device, EvalSettings(classes.num_classes, crack_id=classes.crack_id))
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


def step_gradients(model, options, prepared, context):
    """What a pruning step calls first: Taylor's gradients on --calib_batches fresh batches, or None."""
    if options.importance_type != "Taylor":
        return None

    def gradients():
        batches = [next(prepared.calibration) for _ in range(options.calib_batches)]
        taylor_gradients(model, batches, prepared.criterion, context.device,
                         train_mode=options.calib_mode == "train")

    return gradients


def prune_in_steps(model, options, prepared, context, on_step, ignored_layers=(), part_ratios=None):
    """Reach `options`' (a PruneOptions) --pruning_ratio in --iterative_steps steps (Taylor gradients before,
    fine-tuning after each); on_step(step, percent, seconds, miou_before_finetune) after every step. Returns the
    pruning history.

    A step that removes no channel is an error: frozen or ignored layers would otherwise pass silently.
    ignored_layers are left whole (the study's sensitivity prunes one part at a time). part_ratios ({module-name
    prefix: percent}, a per-part plan) replace --pruning_ratio; on_step's percent is then None.
    """
    kind = options.importance_type
    ratio = ({prefix: ratio_fraction(percent) for prefix, percent in part_ratios.items()} if part_ratios
             else ratio_fraction(options.pruning_ratio))
    pruner = build_pruner(model, make_importance(kind, options.p_value, options.seed), ratio,
                          options.iterative_steps, options.global_pruning, options.round_to, ignored_layers)
    amount = "a per-part plan" if part_ratios else f"{options.pruning_ratio:g}%"
    for step in range(1, options.iterative_steps + 1):
        started, before = time.perf_counter(), models.count_parameters(model)
        prune_step(pruner, model, step_gradients(model, options, prepared, context))
        if (any(part_ratios.values()) if part_ratios else options.pruning_ratio > 0) \
                and models.count_parameters(model) == before:
            raise UserError(f"pruning step {step} removed no channel ({kind}, {amount}): nothing in "
                            f"the network could be pruned; check --round_to and the layers left to prune")
        miou_pruned = validation_miou(model, prepared, context.device) if options.finetune_epochs else None
        if options.finetune_epochs:
            finetune(model, prepared, options, context, options.finetune_epochs, options.seed + step)
        on_step(step, None if part_ratios else round(100 * pruner.per_step_pruning_ratio[step], 2),
                time.perf_counter() - started, miou_pruned)
    return json_history(pruner.pruning_history())


# --- pruning to a budget: per-part ratios from measured sensitivity and cost (docs/ARCHITECTURE.md, Pruning) ------

PLAN_FORMAT = "cracksense-pruning-plan"
RATIO_STEP = 10       # percent: each part is measured at every multiple; a greedy choice cuts one part this more
MAX_PART_RATIO = 90   # percent: no part loses more of its channels
FREE_DROP = 1e-4      # a val mIoU drop no larger (or a gain) counts as this: such a cut is chosen by what it saves


@dataclass(frozen=True)
class Budget:
    """What a plan must meet: GMACs (counted, as everywhere) or latency in ms (utils.timing's one measurement: the
    deployed network, batch 1, on `device`), at size x size px."""
    kind: str  # "gmacs" or "latency_ms"
    target: float
    size: int
    device: str
    runs: int

    def cost(self, network):
        if self.kind == "gmacs":
            return models.count_macs(network, self.size, self.device)[0] / 1e9
        return 1000 * deployed_latencies([network], self.size, self.device, self.runs)[0]

    def text(self, value):
        return f"{value:.3f} GMACs" if self.kind == "gmacs" else f"{value:.1f} ms"

    @property
    def where(self):
        return f"at {self.size}x{self.size} px" + ("" if self.kind == "gmacs" else f" on {self.device}")


def make_budget(options):
    """The Budget of --target_gmacs or --target_latency_ms, or None."""
    if options.budget_option is None:
        return None
    kind = options.budget_option[len("--target_"):]
    return Budget(kind, getattr(options, f"target_{kind}"), options.measure_size, options.device, options.timing_runs)


def magnitude_cut(model, ratio, round_to, global_pruning=False):
    """A copy of `model` cut in one step by L2 magnitude (`ratio`: a fraction for every layer, or {prefix:
    fraction} per part): what a budget's cost is measured on, since a cost depends on the widths, not on which
    channels go."""
    network = copy.deepcopy(model)
    prune_step(build_pruner(network, make_importance("Magnitude", 2), ratio, 1, global_pruning, round_to), network)
    return network


def refuse_unprunable(budget, dense_cost):
    """A budget at or above the dense network's cost leaves nothing to prune: one line."""
    if dense_cost <= budget.target:
        raise UserError(f"--target_{budget.kind} {budget.target:g} is not below the dense network's "
                        f"{budget.text(dense_cost)} {budget.where}: nothing to prune; give a smaller budget")


class PlanProbe:
    """Copies of the network cut part by part in one step, no fine-tuning: by the run's criterion for the val mIoU
    they lose, by magnitude where only their cost counts (a cost depends on the widths, not on which channels go)."""

    def __init__(self, model, tuning, prepared, context, budget):
        self.model, self.tuning, self.prepared, self.context, self.budget = model, tuning, prepared, context, budget
        self.costs = {}

    def cut(self, percents):
        """A copy cut by the run's criterion (the val mIoU it loses is measured on it)."""
        network, tuning = copy.deepcopy(self.model), self.tuning
        pruner = build_pruner(network, make_importance(tuning.importance_type, tuning.p_value, tuning.seed),
                              {prefix: percent / 100 for prefix, percent in percents.items()}, 1, False,
                              tuning.round_to)
        prune_step(pruner, network, step_gradients(network, tuning, self.prepared, self.context))
        return network

    def cost(self, percents):
        """The budget's cost of the network with these per-part percents (measured once per plan)."""
        key = tuple(sorted(percents.items()))
        if key not in self.costs:
            fractions = {prefix: percent / 100 for prefix, percent in percents.items()}
            self.costs[key] = self.budget.cost(magnitude_cut(self.model, fractions, self.tuning.round_to))
        return self.costs[key]


def part_sensitivity(probe, parts, dense_miou):
    """Per part and ratio (RATIO_STEP to MAX_PART_RATIO): the val mIoU it loses cut alone, and the cost then."""
    rows = []
    for part, prefix in parts.items():
        for percent in range(RATIO_STEP, MAX_PART_RATIO + 1, RATIO_STEP):
            network = probe.cut({prefix: percent})
            miou = validation_miou(network, probe.prepared, probe.context.device)
            row = {"part": part, "prefix": prefix, "pruning_ratio": percent, "val_miou": miou,
                   "val_miou_drop": dense_miou - miou, "cost": probe.budget.cost(network)}
            print(f"  {part:<16} {percent:>3}%: val mIoU {100 * miou:6.2f}% (drop {100 * row['val_miou_drop']:+.2f} "
                  f"points), {probe.budget.text(row['cost'])}", flush=True)
            rows.append(row)
    return rows


def greedy_percents(rows, dense_cost, target, measure):
    """Per-part percents: from none, repeatedly cut by RATIO_STEP more the part whose next step saves the most cost
    per val mIoU lost (both as measured with the part cut alone) until `measure(percents)`, the real cost, is at most
    `target`; then the last part chosen is bisected to the whole percent that just meets it. (percents, cost)."""
    saved = {(row["prefix"], row["pruning_ratio"]): dense_cost - row["cost"] for row in rows}
    drop = {(row["prefix"], row["pruning_ratio"]): row["val_miou_drop"] for row in rows}
    percents = {row["prefix"]: 0 for row in rows}
    for prefix in percents:
        saved[prefix, 0], drop[prefix, 0] = 0.0, 0.0

    def merit(prefix):
        now, then = percents[prefix], percents[prefix] + RATIO_STEP
        return (saved[prefix, then] - saved[prefix, now]) / max(drop[prefix, then] - drop[prefix, now], FREE_DROP)

    while True:
        choices = [prefix for prefix, percent in percents.items() if percent + RATIO_STEP <= MAX_PART_RATIO]
        chosen = max(choices, key=merit)
        percents[chosen] += RATIO_STEP
        estimate = dense_cost - sum(saved[prefix, percent] for prefix, percent in percents.items())
        if (estimate <= target or len(choices) == 1) and measure(percents) <= target:
            break
    low, high = percents[chosen] - RATIO_STEP, percents[chosen]
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if measure({**percents, chosen: middle}) <= target else (middle, high)
    percents[chosen] = high
    return percents, measure(percents)


def plan_to_budget(model, arch, tuning, prepared, context, budget):
    """The per-part plan that meets `budget` with the least val mIoU lost (greedy over measured sensitivity and
    cost); a budget at or above the dense cost, or below every part cut by MAX_PART_RATIO, is one line."""
    parts = network_parts(model)
    probe = PlanProbe(model, tuning, prepared, context, budget)
    dense_cost = budget.cost(model)
    option = f"--target_{budget.kind}"
    refuse_unprunable(budget, dense_cost)
    floor = probe.cost({prefix: MAX_PART_RATIO for prefix in parts.values()})
    if budget.target < floor:
        raise UserError(f"{option} {budget.target:g} is below what pruning reaches: {budget.text(floor)} "
                        f"{budget.where} with every part ({', '.join(parts)}) cut by {MAX_PART_RATIO}%; give at "
                        f"least that")
    dense_miou = validation_miou(model, prepared, context.device)
    print(f"planning {option} {budget.target:g} {budget.where} (dense {budget.text(dense_cost)}, val mIoU "
          f"{100 * dense_miou:.2f}%): each part cut alone by {tuning.importance_type} at {RATIO_STEP}% steps, "
          f"no fine-tuning", flush=True)
    rows = part_sensitivity(probe, parts, dense_miou)
    percents, cost = greedy_percents(rows, dense_cost, budget.target, probe.cost)
    return {"format": PLAN_FORMAT, "version": 1, "arch": arch, "budget": dataclasses.asdict(budget),
            "importance": tuning.importance_type, "p_value": tuning.p_value, "round_to": tuning.round_to,
            "parts": {part: {"prefix": prefix, "pruning_ratio": percents[prefix]} for part, prefix in parts.items()},
            "dense": {"cost": dense_cost, "val_miou": dense_miou}, "planned_cost": cost, "sensitivity": rows}


def uniform_ratio_for(budget, model, tuning):
    """The uniform --pruning_ratio (percent, in tenths) whose network just meets `budget`: the uniform network at
    equal cost that a per-part plan is compared with. Bisected on copies cut in one step by magnitude (a cost
    depends on the widths, not on which channels go) with tuning's --global_pruning and --round_to."""
    def cost(tenths):
        return budget.cost(magnitude_cut(model, tenths / 1000, tuning.round_to, tuning.global_pruning))

    refuse_unprunable(budget, budget.cost(model))
    low, high = 0, 10 * MAX_PART_RATIO
    floor = cost(high)
    if floor > budget.target:
        raise UserError(f"--target_{budget.kind} {budget.target:g} is below what uniform pruning reaches: "
                        f"{budget.text(floor)} {budget.where} at {MAX_PART_RATIO}%; give at least that")
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if cost(middle) <= budget.target else (middle, high)
    return high / 10


def read_plan(path, model, arch):
    """A plan saved beside a checkpoint (NAME_plan.json), checked against this network: one line when it is not."""
    text = Path(require_path(path, "--plan file", "file")).read_text(errors="replace")
    try:
        plan = json.loads(text)
    except ValueError as error:
        raise UserError(f"{path} is not a pruning plan ({str(error)[:60]}); pass a NAME_plan.json that "
                        f"torchvision_pruning.py wrote") from None
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("parts"), dict):
        raise UserError(f"{path} is not a pruning plan; pass a NAME_plan.json that torchvision_pruning.py wrote")
    if plan.get("arch") != arch:
        raise UserError(f"{path} was planned for a {plan.get('arch')} network, not this {arch}; plan it again with "
                        f"--target_gmacs or --target_latency_ms")
    known = set(network_parts(model).values())
    for part, entry in plan["parts"].items():
        if not isinstance(entry, dict) or entry.get("prefix") not in known or \
                not isinstance(entry.get("pruning_ratio"), (int, float)) or not 0 <= entry["pruning_ratio"] <= 99:
            raise UserError(f"{path}: part {part!r} is no part of this network with a ratio from 0 to 99 (damaged "
                            f"or edited plan)")
    return plan


def describe_plan(plan):
    """'backbone layer1 0%, ...' : the chosen ratio of every part."""
    return ", ".join(f"{part} {entry['pruning_ratio']:g}%" for part, entry in plan["parts"].items())


def save_plan(plan, path):
    text = json.dumps(plan, indent=1)
    replace_atomically(path, lambda temporary: Path(temporary).write_text(text))


def budget_line(plan, facts, options):
    """'budget: target ..., achieved ...': the achieved cost of the pruned network against the target."""
    budget = plan["budget"]
    if budget["kind"] == "gmacs":
        achieved, unit, dense = facts["macs"] / 1e9, "GMACs", facts["dense_macs"] / 1e9
    else:
        achieved, unit, dense = 1000 * facts["latency_seconds"], "ms", 1000 * facts["dense_latency_seconds"]
    where = f"at {options.measure_size}x{options.measure_size} px" + (f" on {options.device}" if unit == "ms" else "")
    return (f"budget: target {budget['target']:g} {unit} {where}; achieved {achieved:.3f} {unit} "
            f"({100 * achieved / budget['target']:.1f}% of the target; dense {dense:.3f} {unit})")


def make_plan(model, arch, options, prepared, context):
    """The per-part plan of --target_gmacs/--target_latency_ms (planned now) or --plan (read), printed; None for
    uniform pruning."""
    budget = make_budget(options)
    if budget is not None:
        plan = plan_to_budget(model, arch, options.prune, prepared, context, budget)
        print(f"plan: {describe_plan(plan)} -> {budget.text(plan['planned_cost'])} {budget.where} (target "
              f"{budget.target:g})", flush=True)
        return plan
    if options.plan is not None:
        plan = {**read_plan(options.plan, model, arch), "replayed_from": str(options.plan)}
        print(f"plan from {options.plan}: {describe_plan(plan)}", flush=True)
        return plan
    return None


def run(options):
    """Load, prune in --iterative_steps (every layer by --pruning_ratio, or each part by its ratio in a plan made
    for --target_gmacs/--target_latency_ms or read from --plan), score, time dense against pruned, save.
    `options` is a PruneRun."""
    tuning, context = options.prune, DistContext(device=torch.device(options.device))
    kind = tuning.importance_type
    seed_everything(tuning.seed)
    model, arch, earlier_history, source, classes = load_for_pruning(options.state_dict, options.arch, options.init,
                                                                     options.allow_pickle, options.output_stride)
    paths = output_paths(options.output_dir, options.model_name or default_model_name(arch, kind, tuning.p_value,
                                                                                      _amount(options)))
    per_part = tuning.pruning_ratio is None
    # The steps table is written as the steps go: one without its checkpoint is a failed run's, replaced.
    refuse_existing([paths["checkpoint"]] + ([paths["pickle"]] if options.save_pickle else []) +
                    ([paths["plan"]] if per_part else []), options.overwrite, "choose another --model_name")
    if options.keep_feature_extract:
        models.freeze_all_but_head(model)
    model.to(context.device)
    prepared = prepare_data(options.tuning, tuning, context)
    require_classes(prepared, classes, source)
    plan = make_plan(model, arch, options, prepared, context)
    percents = None if plan is None else {entry["prefix"]: entry["pruning_ratio"] for entry in plan["parts"].values()}
    amount = "each part by its planned ratio" if per_part else f"{tuning.pruning_ratio:g}% of channels"
    print(f"pruning {arch} from {source}: {amount} by {kind} importance"
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

    history = earlier_history + prune_in_steps(model, tuning, prepared, context, on_step, part_ratios=percents)
    facts = _measure(dense, model, options, context.device)
    del dense
    _save(model, (arch, classes), history, _extras(options, source, facts, table.rows, plan), paths,
          options.save_pickle)
    if plan is not None:
        save_plan({**plan, "achieved": _achieved(facts)}, paths["plan"])
        print(f"saved {paths['plan']}", flush=True)
    print(final_line(facts, options.measure_size, context.device), flush=True)
    if plan is not None and "replayed_from" not in plan:
        print(budget_line(plan, facts, options), flush=True)
    return paths["checkpoint"]


def _amount(options):
    """The amount in a default name: the percent, the budget ('4.5gmacs', '50ms') or 'plan'."""
    if options.prune.pruning_ratio is not None:
        return options.prune.pruning_ratio
    if options.target_gmacs is not None:
        return f"{options.target_gmacs:g}gmacs"
    return f"{options.target_latency_ms:g}ms" if options.target_latency_ms is not None else "plan"


def _achieved(facts):
    latency = facts["latency_seconds"]
    return {"gmacs": facts["macs"] / 1e9, "params": facts["params"],
            "latency_ms": None if latency is None else 1000 * latency}


def _extras(options, source, facts, steps, plan):
    """The pruning facts a checkpoint carries (docs/ARCHITECTURE.md, Checkpoints); a plan's per-part ratios
    instead of pruning_ratio."""
    tuning = options.prune
    amount = ({"pruning_ratio": tuning.pruning_ratio} if plan is None else
              {"part_ratios": {part: entry["pruning_ratio"] for part, entry in plan["parts"].items()},
               "target_gmacs": options.target_gmacs, "target_latency_ms": options.target_latency_ms})
    return {**amount, "importance": tuning.importance_type, "p_value": tuning.p_value,
            "iterative_steps": tuning.iterative_steps, "finetune_epochs": tuning.finetune_epochs,
            "global_pruning": tuning.global_pruning, "round_to": tuning.round_to, "source": source,
            "measure_size": options.measure_size, **facts, "steps": steps, "args": options.flat()}


def _measure(dense, pruned, options, device):
    """MACs and parameters of the deployed networks (aux head dropped), and their latency as utils.timing measures
    every latency (BatchNorm folded, warm-up, median of interleaved rounds)."""
    facts = {}
    for prefix, network in (("dense_", dense), ("", pruned)):
        facts[f"{prefix}macs"], facts[f"{prefix}params"] = models.count_macs(network, options.measure_size, device)
    facts["dense_latency_seconds"] = facts["latency_seconds"] = None
    if options.timing_runs:
        facts["dense_latency_seconds"], facts["latency_seconds"] = deployed_latencies(
            [dense, pruned], options.measure_size, device, options.timing_runs)
    return facts


def _save(model, network, history, extras, paths, save_pickle):
    """The pruned checkpoint (network: its arch and ClassTable), the steps table beside it, the pickle if asked."""
    arch, classes = network
    save_atomic(make_checkpoint(model, arch, classes, pruning=history, **extras), paths["checkpoint"])
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
