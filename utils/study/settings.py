"""study.py's options (StudyOptions, checked when made), the PruneOptions of each (variant, seed), and the settings
that define a study (what its manifest records and a resume must repeat).

Floor 7 (docs/ARCHITECTURE.md).
"""
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from utils.cli import UserError, cap_workers, check_batch_memory, plain_name, require_path, resolve_device
from utils.finetune import FINETUNE_DEFAULTS, FinetuneBudget
from utils.prune_ops import importance_name, importance_spec
from utils.pruning import PruneOptions, at_least
from utils.quantize import Int8Recipe
from utils.recipe import Recipe
from utils.study.grid import TWIN, Variant, check_seeds, variant_grid

# StudyOptions' fields that do not change what a study measures (where it runs and writes, how long timing takes);
# every other field, the recipe's and the fine-tuning budget's included, is a setting a rerun must repeat.
NOT_SETTINGS = ("allow_pickle", "sensitivity", "name", "latency_runs", "output_dir", "overwrite", "device", "workers")
PATH_SETTINGS = ("state_dict", "data", "val_data", "test_data")


@dataclass(frozen=True)
class StudyOptions:
    """study.py's options as plain values: everything below the script reads these, never the Namespace."""
    state_dict: str
    allow_pickle: bool
    pruning_ratio: tuple
    importance_type: tuple
    p_value: tuple
    iterative_steps: tuple
    global_pruning: bool
    round_to: int | None
    sensitivity: bool
    data: str | None
    val_data: str | None
    test_data: str | None
    calib_batches: int
    calib_mode: str
    name: str
    lt_tolerance: int
    measure_size: int
    latency_runs: int
    output_dir: str
    overwrite: bool
    device: str
    workers: int
    seeds: tuple
    output_stride: int | None = None
    target_gmacs: tuple = ()
    int8: tuple | None = None
    calib_images: int = 16
    int8_recipe: Int8Recipe = dataclasses.field(default_factory=Int8Recipe)
    bn_recalibrate: int = FINETUNE_DEFAULTS["bn_recalibrate"]
    recipe: Recipe = dataclasses.field(default_factory=Recipe)
    finetuning: FinetuneBudget = dataclasses.field(default_factory=FinetuneBudget)

    def __post_init__(self):
        """Every check that needs no file, before anything is loaded: one line and exit 2 each; --device resolved
        and --workers capped here, nothing changed later."""
        plain_name(self.name, "--name")
        grid = options_grid(self)
        check_seeds(self.seeds)
        gradients = [variant.importance for variant in grid if importance_spec(variant.importance).needs_gradients]
        if gradients and not self.data:
            raise UserError(f"--importance_type {gradients[0]} needs --data TRAIN_DIR: its ranking uses gradients of "
                            f"the real loss on training images")
        if self.finetuning.tunes and not self.data:
            raise UserError("fine-tuning (--finetune_steps, --finetune_minutes, --step_finetune_steps) needs "
                            "--data TRAIN_DIR; pass --finetune_steps 0 to compare untuned")
        if (self.finetuning.finetune_steps or self.finetuning.finetune_minutes) and not self.val_data:
            raise UserError("fine-tuning keeps the best step by val mIoU and needs --val_data VAL_DIR")
        if self.finetuning.finetune_minutes is not None:
            raise UserError("--finetune_minutes would give faster variants more steps than slower ones; a study gives "
                            "every arm the same --finetune_steps")
        if self.sensitivity and not self.pruning_ratio:
            raise UserError("--sensitivity prunes each part at each --pruning_ratio; give at least one")
        if self.sensitivity and not self.val_data:
            raise UserError("--sensitivity scores each part's pruning on --val_data VAL_DIR; pass it")
        if not self.sensitivity and not self.test_data:
            raise UserError("the study scores every variant on --test_data TEST_DIR; pass it")
        self._check_compression(grid)
        at_least(self, calib_batches=1, measure_size=32, latency_runs=0, workers=0, lt_tolerance=0, bn_recalibrate=0)
        if self.recipe.distill and not self.finetuning.tunes:
            raise UserError("--distill acts during fine-tuning; add --finetune_steps N or drop --distill")
        object.__setattr__(self, "device", str(resolve_device(self.device)))
        object.__setattr__(self, "workers", cap_workers(self.workers))
        recipe = self.recipe.settled()
        check_batch_memory(recipe.batch_size, recipe.crop_size, "--batch_size x --crop_size")

    def _check_compression(self, grid):
        """--target_gmacs plans on the val split, per part; --int8 calibrates on it and names variants of the grid."""
        if self.target_gmacs and not self.val_data:
            raise UserError("--target_gmacs plans each part's ratio from its val mIoU drop and needs --val_data VAL_DIR")
        if self.target_gmacs and self.global_pruning:
            raise UserError("--target_gmacs compares a per-part plan with uniform pruning at equal GMACs; "
                            "--global_pruning decides the widths itself, so drop one of them")
        if self.int8 is None:
            if self.int8_recipe != Int8Recipe():
                raise UserError("--int8_target, --int8_weights, --int8_reduce_range, --int8_calibration and "
                                "--int8_float_layers are only used with --int8; add --int8 or drop them")
            return
        if not self.val_data:
            raise UserError("--int8 calibrates the INT8 graphs on --val_data VAL_DIR; pass it")
        if self.measure_size % 8:
            raise UserError(f"--int8 exports at --measure_size, which must be a multiple of 8, got {self.measure_size}")
        at_least(self, calib_images=1)
        known = [TWIN] + [variant.name for variant in grid]
        unknown = [name for name in self.int8 if name not in known]
        if unknown:
            raise UserError(f"--int8 {unknown[0]}: no such variant in this grid; give none (every variant) or some "
                            f"of {', '.join(known)}")

    def wants_int8(self, variant_name):
        """Whether --int8 adds an INT8 row (and its float32 graph's row) for this variant (no names: every variant
        and the dense twin)."""
        return self.int8 is not None and (not self.int8 or variant_name in self.int8)

    @property
    def seed(self):
        """The first seed: prepare_data's loaders and the sensitivity runs take one."""
        return self.seeds[0]

    def settled(self, trained_with):
        """These options with the recipe's fields not given taken from the dense network's training args
        (`trained_with`), else the Recipe's defaults: every arm fine-tunes as the network was trained."""
        return dataclasses.replace(self, recipe=self.recipe.settled(trained_with))


def prune_options(options, variant, seed, ratio=None):
    """torchvision_pruning.py's options for one variant and seed, from the study's (variant None: the dense twin's
    recipe, nothing pruned; `ratio`: the uniform ratio found for a budget)."""
    variant = variant or Variant("Magnitude", None, 0.0, 1)
    return PruneOptions(
        importance_type=variant.importance, p_value=variant.p_value or 2,
        pruning_ratio=variant.ratio if ratio is None else ratio,
        iterative_steps=variant.steps, global_pruning=options.global_pruning, round_to=options.round_to,
        calib_batches=options.calib_batches, calib_mode=options.calib_mode, seed=seed, workers=options.workers,
        bn_recalibrate=options.bn_recalibrate, recipe=options.recipe, finetuning=options.finetuning)


def options_grid(options):
    return variant_grid(options.importance_type, options.p_value, options.pruning_ratio, options.iterative_steps,
                        options.target_gmacs)


def study_settings(options):
    """The arguments that define the study (every field but NOT_SETTINGS; the recipe, the fine-tuning budget and the
    INT8 recipe as dicts of their fields), normalised (absolute paths, canonical criterion names, lists)."""
    settings = {item.name: getattr(options, item.name) for item in dataclasses.fields(options)
                if item.name not in NOT_SETTINGS}
    settings = {key: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
                for key, value in settings.items()}
    settings = json.loads(json.dumps(settings))  # tuples become lists, as the manifest reads them back
    for key in PATH_SETTINGS:
        settings[key] = str(Path(settings[key]).resolve()) if settings[key] else None
    settings["state_dict_sha256"] = file_digest(options.state_dict)  # the same path after retraining: another study
    settings["importance_type"] = [importance_name(name) for name in options.importance_type]
    settings["pruning_ratio"] = [float(ratio) for ratio in options.pruning_ratio]
    settings["target_gmacs"] = [float(target) for target in options.target_gmacs]
    return settings


def file_digest(path):
    hasher = hashlib.sha256()
    with open(require_path(path, "--state_dict file", "file"), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()
