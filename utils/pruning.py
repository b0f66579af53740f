"""Pruning in steps: load a trained network, rank and remove channels in --iterative_steps (Taylor's gradients
before each step, BatchNorm statistics re-estimated after it, a short fine-tuning between steps).

Floor 6 (docs/ARCHITECTURE.md): the channel surgery is utils.prune_ops', recovery (recalibration, fine-tuning) is
utils.finetune's with the Recipe train.py trains with. torchvision_pruning.py's run is utils.prune_run, budgets and
plans utils.planning, the study utils.study; all prune through prune_in_steps.
"""
import time
from dataclasses import dataclass, field

from utils import data, model as models
from utils.checkpoint import build_from_checkpoint, checkpoint_classes, load_weights, read_checkpoint
from utils.cli import UserError, cap_workers, check_number
from utils.finetune import FINETUNE_DEFAULTS, FinetuneBudget, finetune, recalibrate, validation_miou
from utils.prune_ops import (build_pruner, importance_name, importance_spec, json_history, make_importance,
                             match_pruned_widths, prune_step, ratio_fraction, shapes_differ, slice_extra_outputs,
                             taylor_gradients)
from utils.recipe import Recipe


@dataclass
class Loaded:
    """A network to prune: the model, its arch, its earlier pruning history, where it came from, its ClassTable and
    the options it was trained with (its checkpoint's `args`; {} for other files), which fine-tuning settles on."""
    model: object
    arch: str
    history: list
    source: str
    classes: data.ClassTable
    trained_with: dict = field(default_factory=dict)


def load_for_pruning(state_dict=None, arch=None, init=None, allow_pickle=False, stride=None):
    """A Loaded network from --state_dict (classes: its ClassTable), or a fresh --arch/--init network (S2DS's
    classes).

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
        return Loaded(network, arch, [], f"--init {init}", data.S2DS_CLASSES)
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
    trained_with = checkpoint.get("args") if isinstance(checkpoint.get("args"), dict) else {}
    return Loaded(model, checkpoint["arch"], history, str(state_dict), classes, trained_with)



@dataclass(frozen=True)
class PruneOptions:
    """How channels are ranked and removed and how the network recovers: what prune_in_steps reads, under
    torchvision_pruning.py's option names (the study builds one per (variant, seed)). `recipe` is the training
    recipe of every fine-tuning (settled from the pruned network's own training args where not given), `finetuning`
    its budget. Checked and normalised when made: the criterion's canonical spelling, --workers capped."""
    importance_type: str
    p_value: int
    pruning_ratio: float | None
    iterative_steps: int
    global_pruning: bool
    round_to: int | None
    calib_batches: int
    calib_mode: str
    seed: int
    workers: int
    bn_recalibrate: int = FINETUNE_DEFAULTS["bn_recalibrate"]
    recipe: Recipe = field(default_factory=Recipe)
    finetuning: FinetuneBudget = field(default_factory=FinetuneBudget)

    def __post_init__(self):
        object.__setattr__(self, "importance_type", importance_name(self.importance_type))
        make_importance(self.importance_type, self.p_value)  # checks --p_value
        if self.pruning_ratio is not None:
            ratio_fraction(check_number("pruning_ratio", self.pruning_ratio))
        at_least(self, iterative_steps=1, calib_batches=1, workers=0, bn_recalibrate=0, seed=0)
        if self.round_to is not None and self.round_to < 1:
            raise UserError(f"--round_to must be a positive number of channels, got {self.round_to}")
        object.__setattr__(self, "workers", cap_workers(self.workers))

    @property
    def needs_data(self):
        """Why --data TRAIN_DIR is needed (a criterion ranking by gradients, fine-tuning), or None."""
        if importance_spec(self.importance_type).needs_gradients:
            return f"--importance_type {self.importance_type}"
        return "fine-tuning (--finetune_steps, --finetune_minutes, --step_finetune_steps)" \
            if self.finetuning.tunes else None


def at_least(options, **lowest):
    """One-line UserError for the first option of `options` below its lowest value (or not a finite number)."""
    for option, bound in lowest.items():
        check_number(option, getattr(options, option), minimum=bound)


def require_classes(prepared, classes, source):
    """Refuse --data/--val_data whose class table is not the network's (ClassTable `classes`): fine-tuning and
    scores would mean other classes."""
    splits = [prepared.train_set, prepared.val_loader.dataset if prepared.val_loader is not None else None]
    for split in (split for split in splits if split is not None):
        data.require_same_classes(classes, split, source)


def step_gradients(model, options, prepared, context):
    """What a pruning step calls first: gradients of the loss on --calib_batches fresh batches for a criterion that
    ranks by them (IMPORTANCES' needs_gradients), or None."""
    if not importance_spec(options.importance_type).needs_gradients:
        return None

    def gradients():
        batches = [next(prepared.calibration) for _ in range(options.calib_batches)]
        taylor_gradients(model, batches, prepared.criterion, context.device,
                         train_mode=options.calib_mode == "train")

    return gradients


def prune_in_steps(model, options, prepared, context, on_step, ignored_layers=(), part_ratios=None):
    """Reach `options`' (a PruneOptions) --pruning_ratio in --iterative_steps steps: gradients before each step,
    BatchNorm recalibrated on --bn_recalibrate batches after it, --step_finetune_steps of fine-tuning after every
    step but the last (the final fine-tuning is the caller's); on_step(step, percent, seconds, val mIoU pruned and
    recalibrated, val mIoU after that step's fine-tuning or None) after every step (mIoUs None without --val_data).
    Returns the pruning history.

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
        if prepared.calibration is not None:
            recalibrate(model, prepared, options.bn_recalibrate, context.device)
        miou_pruned = validation_miou(model, prepared, context.device) if prepared.val_loader is not None else None
        between = options.finetuning.step_finetune_steps if step < options.iterative_steps else 0
        miou_tuned = finetune(model, prepared, options.recipe, options.finetuning, context, between).val_miou \
            if between else None
        on_step(step, None if part_ratios else round(100 * pruner.per_step_pruning_ratio[step], 2),
                time.perf_counter() - started, miou_pruned, miou_tuned)
    return json_history(pruner.pruning_history())
