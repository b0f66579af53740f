"""The pruning study behind study.py: every criterion x p x ratio x schedule, each repeated per seed, pruned,
fine-tuned, scored on the test split as test.py scores it, timed as every latency is timed, and compared with a
dense twin fine-tuned by the same recipe; tabulated per seed and as mean and spread, plotted; resumable after a kill.

Floor 6 (docs/ARCHITECTURE.md): the pruning, fine-tuning and validation are utils.pruning's, the scoring is
utils.evaluation's (so study.csv matches test.py to the last digit), the latency utils.timing's (the one measure
benchmark.py, torchvision_pruning.py and test.py use). This module only walks the grid, keeps the manifest and
writes the tables and figures.

Fair comparison: every pruned variant is fine-tuned for --finetune_epochs, so the dense network gets a twin
("dense fine-tuned") fine-tuned from the same weights with the same recipe, epochs and seed; every change against
dense is taken against that twin, seed by seed. The untuned dense row stays in the table, labelled as such.

Noise: each variant and the twin run once per --seeds value (pruning randomness, Taylor's calibration batches,
crops and the order of fine-tuning batches all follow the seed). A mean change against the twin no larger than the
spread (the larger sample standard deviation over seeds of the variant and of the twin) is marked within noise.

Resuming: OUTPUT_DIR/studies/NAME/study.json holds the normalised arguments and every finished (variant, seed),
replaced atomically after each one; a checkpoint carries the digest of those arguments, so one that was saved but
not yet scored when the run was killed is scored, not pruned again.
"""
import copy
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt

from utils import data, model as models
from utils.checkpoint import (checkpoint_classes, load_for_inference, load_model, make_checkpoint, read_checkpoint,
                              save_atomic)
from utils.cli import UserError, cap_workers, check_batch_memory, device_name, plain_name, require_path, resolve_device
from utils.deploy import ExportOptions, export_float, export_int8, int8_path, parity_passed
from utils.distributed import DistContext
from utils.engine import EvalSettings
from utils.evaluation import collect_metrics, evaluate_split
from utils.files import refuse_existing, replace_atomically
from utils.onnx_model import OnnxNetwork
from utils.prune_ops import USES_P_VALUE, importance_name, layers_outside, network_parts, ratio_fraction
from utils.pruning import (Budget, PruneOptions, TuningData, at_least, describe_plan, endless_batches, finetune,
                           load_for_pruning, plan_to_budget, prepare_data, prune_in_steps, require_classes,
                           uniform_ratio_for, validation_miou)
from utils.quantize import Int8Recipe
from utils.recipe import seed_everything, train_loader
from utils.report import Column, Schema, write_csv, write_workbook
from utils.timing import ROUNDS, WARMUP, deployed_latencies

MANIFEST = "study.json"
OUTPUT_FILES = ("study.json", "study.csv", "study_summary.csv", "study.xlsx", "study.png", "sensitivity.csv",
                "sensitivity.png")
# The arguments that make a study what it is; a rerun under the same --name must repeat them.
SETTINGS = ("state_dict", "data", "val_data", "test_data", "importance_type", "p_value", "pruning_ratio",
            "iterative_steps", "global_pruning", "round_to", "finetune_epochs", "step_finetune_epochs",
            "calib_batches", "calib_mode", "batch_size", "crop_size", "lr", "optimizer", "weight_decay", "loss",
            "measure_size", "lt_tolerance", "seeds", "output_stride", "target_gmacs", "int8", "calib_images",
            "int8_recipe")
PATH_SETTINGS = ("state_dict", "data", "val_data", "test_data")
DENSE, TWIN = "dense", "dense_finetuned"
INT8 = "_int8"  # the suffix of a variant's INT8 row, before _seed<S>
ONNX = "_onnx"  # ... and of its float32 graph's row: INT8's control, the same runtime without quantisation
ONNX_FLOAT = "float32 (onnxruntime)"  # that row's precision; "float32" alone is the PyTorch checkpoint


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
    finetune_epochs: int
    step_finetune_epochs: int
    calib_batches: int
    calib_mode: str
    batch_size: int
    crop_size: int
    lr: float
    optimizer: str
    weight_decay: float
    loss: str
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

    def __post_init__(self):
        """Every check that needs no file, before anything is loaded: one line and exit 2 each; --device resolved
        and --workers capped here, nothing changed later."""
        plain_name(self.name, "--name")
        grid = options_grid(self)
        check_seeds(self.seeds)
        if any(variant.importance == "Taylor" for variant in grid) and not self.data:
            raise UserError("--importance_type Taylor needs --data TRAIN_DIR: its ranking uses gradients of the real "
                            "loss on training images")
        tuning = self.finetune_epochs > 0 or (self.step_finetune_epochs > 0 and max(self.iterative_steps) > 1)
        if tuning and not self.data:
            raise UserError("fine-tuning (--finetune_epochs, --step_finetune_epochs) needs "
                            "--data TRAIN_DIR; pass --finetune_epochs 0 --step_finetune_epochs 0 to compare untuned")
        if self.finetune_epochs > 0 and not self.val_data:
            raise UserError("--finetune_epochs keeps the best epoch by val mIoU and needs --val_data VAL_DIR")
        if self.sensitivity and not self.pruning_ratio:
            raise UserError("--sensitivity prunes each part at each --pruning_ratio; give at least one")
        if self.sensitivity and not self.val_data:
            raise UserError("--sensitivity scores each part's pruning on --val_data VAL_DIR; pass it")
        if not self.sensitivity and not self.test_data:
            raise UserError("the study scores every variant on --test_data TEST_DIR; pass it")
        self._check_compression(grid)
        at_least(self, finetune_epochs=0, step_finetune_epochs=0, calib_batches=1, crop_size=8, measure_size=32,
                 latency_runs=0, workers=0, lt_tolerance=0)
        if self.batch_size < 2 and self.data:
            raise UserError(f"--batch_size must be at least 2 for BatchNorm in train mode, got {self.batch_size}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        object.__setattr__(self, "device", str(resolve_device(self.device)))
        object.__setattr__(self, "workers", cap_workers(self.workers))
        check_batch_memory(self.batch_size, self.crop_size, "--batch_size x --crop_size")

    def _check_compression(self, grid):
        """--target_gmacs plans on the val split, per part; --int8 calibrates on it and names variants of the grid."""
        if self.target_gmacs and not self.val_data:
            raise UserError("--target_gmacs plans each part's ratio from its val mIoU drop and needs --val_data VAL_DIR")
        if self.target_gmacs and self.global_pruning:
            raise UserError("--target_gmacs compares a per-part plan with uniform pruning at equal GMACs; "
                            "--global_pruning decides the widths itself, so drop one of them")
        if self.int8 is None:
            if self.int8_recipe != Int8Recipe():
                raise UserError("--int8_weights, --int8_reduce_range and --int8_calibration are only used with "
                                "--int8; add --int8 or drop them")
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

    @property
    def tuning_data(self):
        return TuningData(self.data, self.val_data, self.crop_size, self.loss)


@dataclass(frozen=True)
class Variant:
    """One cell of the grid: criterion, norm (None where the criterion has none), percent removed, steps; or, for
    a --target_gmacs value, that budget met by a per-part plan (budgeted) or by the uniform ratio of equal GMACs
    (ratio None: found when the study runs)."""
    importance: str
    p_value: int | None
    ratio: float | None
    steps: int
    target_gmacs: float | None = None
    budgeted: bool = False

    @property
    def name(self):
        norm = f"_l{self.p_value}" if self.p_value is not None else ""
        amount = (f"{self.ratio:g}pct" if self.target_gmacs is None else
                  f"{self.target_gmacs:g}gmacs_{'budgeted' if self.budgeted else 'uniform'}")
        return f"{self.importance.lower()}{norm}_{amount}_{self.steps}step"

    @property
    def family(self):
        """The line it belongs to in study.png: criterion, norm and schedule (budgeted plans on a line of their
        own; the uniform network of a budget's GMACs on its criterion's uniform line)."""
        norm = f" L{self.p_value}" if self.p_value is not None else ""
        return (f"{self.importance}{norm}{', budgeted' if self.budgeted else ''}, "
                f"{self.steps} step{'s' if self.steps > 1 else ''}")

    @property
    def budget_key(self):
        """Where the study keeps what it found for a budget: the uniform ratio of equal GMACs (one per budget), or
        the per-part plan (one per budget and criterion); None for a plain ratio."""
        if self.target_gmacs is None:
            return None
        norm = f" L{self.p_value}" if self.p_value is not None else ""
        return f"{self.importance}{norm} plan @ {self.target_gmacs:g}" if self.budgeted else \
            f"uniform @ {self.target_gmacs:g}"


def run_name(variant_name, seed):
    """The manifest key and checkpoint stem of one (variant, seed): 'magnitude_l2_30pct_1step_seed1'."""
    return f"{variant_name}_seed{seed}"


def prune_options(options, variant, seed, ratio=None):
    """torchvision_pruning.py's options for one variant and seed, from the study's (variant None: the dense twin's
    recipe, nothing pruned; `ratio`: the uniform ratio found for a budget)."""
    variant = variant or Variant("Magnitude", None, 0.0, 1)
    return PruneOptions(
        importance_type=variant.importance, p_value=variant.p_value or 2,
        pruning_ratio=variant.ratio if ratio is None else ratio,
        iterative_steps=variant.steps, global_pruning=options.global_pruning, round_to=options.round_to,
        finetune_epochs=options.step_finetune_epochs if variant.steps > 1 else 0,
        calib_batches=options.calib_batches, calib_mode=options.calib_mode, seed=seed, optimizer=options.optimizer,
        lr=options.lr, weight_decay=options.weight_decay, batch_size=options.batch_size, workers=options.workers)


def check_seeds(seeds):
    """Distinct, non-negative seeds: a repeated one would count the same run twice in the spread."""
    repeated = sorted({seed for seed in seeds if list(seeds).count(seed) > 1})
    if repeated:
        raise UserError(f"--seeds repeats {repeated[0]}: each seed runs every variant once, so a repeat would count "
                        f"one run twice in the spread; give distinct seeds (e.g. --seeds 1 2 3)")
    if any(seed < 0 for seed in seeds):
        raise UserError(f"--seeds must be non-negative integers, got {min(seeds)}")
    return list(seeds)


def variant_grid(importance_type, p_value, pruning_ratio, iterative_steps, target_gmacs=()):
    """The variants in the order they run, each checked; a bad value or an empty grid is a one-line UserError.
    Each --target_gmacs value adds, per criterion and schedule, the budget met by uniform pruning and by a plan."""
    criteria = list(dict.fromkeys(importance_name(name) for name in importance_type))
    for ratio in pruning_ratio:
        ratio_fraction(ratio)
        if ratio == 0:
            raise UserError("--pruning_ratio 0 prunes nothing; the dense rows are in the study anyway")
    bad_targets = [target for target in target_gmacs if not 0 < target < math.inf]  # NaN too
    if bad_targets:
        raise UserError(f"--target_gmacs must be a positive number of GMACs, got {bad_targets[0]:g}")
    for option, values in (("p_value", p_value), ("iterative_steps", iterative_steps)):
        bad = [value for value in values if value < 1]
        if bad:
            raise UserError(f"--{option} must be at least 1, got {bad[0]}")
    norms = list(dict.fromkeys(p_value))
    if "Random" in criteria and len(norms) > 1:
        raise UserError(f"--importance_type Random has no norm, so a --p_value sweep ({' '.join(map(str, norms))}) "
                        f"gives its control no matching rows; sweep the norm without Random, or give one --p_value")
    grid = []
    for importance in criteria:
        for p in (norms if importance in USES_P_VALUE else [None]):
            for steps in dict.fromkeys(iterative_steps):
                grid += [Variant(importance, p, float(ratio), steps) for ratio in dict.fromkeys(pruning_ratio)]
                grid += [Variant(importance, p, None, steps, float(target), budgeted)
                         for target in dict.fromkeys(target_gmacs) for budgeted in (False, True)]
    if not grid:
        raise UserError("the grid is empty: give at least one --importance_type and --iterative_steps, and a "
                        "--pruning_ratio or a --target_gmacs")
    return grid


def options_grid(options):
    return variant_grid(options.importance_type, options.p_value, options.pruning_ratio, options.iterative_steps,
                        options.target_gmacs)


def study_settings(options):
    """The arguments that define the study, normalised (absolute paths, canonical criterion names, lists)."""
    settings = {key: getattr(options, key) for key in SETTINGS}
    settings = {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}
    settings["int8_recipe"] = dataclasses.asdict(options.int8_recipe)
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


def digest(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _clear(folder):
    """--overwrite: remove what an earlier study wrote here (its variant checkpoints and tables), nothing else."""
    for path in [*Path(folder).glob("*.pth"), *Path(folder).glob("*.onnx")]:
        path.unlink()
    for name in OUTPUT_FILES:
        if (Path(folder) / name).exists():
            (Path(folder) / name).unlink()


def open_study(folder, settings, overwrite):
    """The manifest to continue (same arguments), or a new one: --overwrite starts again, and other arguments than
    the ones the study was run with need it."""
    manifest_path = Path(folder) / MANIFEST
    fresh = {"settings": settings, "digest": digest(settings), "dense": None, "runs": {}, "sensitivity": {},
             "budgets": {}}
    if manifest_path.is_file() and not overwrite:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"{manifest_path} is damaged ({str(error).splitlines()[0][:80]}), so the study cannot "
                            f"resume; pass --overwrite to start it again, or choose another --name") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings", {}), dict):
            raise UserError(f"{manifest_path} is damaged (not a study manifest), so the study cannot resume; pass "
                            f"--overwrite to start it again, or choose another --name")
        if manifest is not None and manifest.get("settings") == settings and "runs" in manifest:
            return manifest
        changed = sorted(key for key in settings if manifest is None or
                         manifest.get("settings", {}).get(key) != settings[key])
        raise UserError(f"{folder} holds a study run with other arguments ({', '.join(changed) or 'unreadable'} "
                        f"differ); repeat its arguments to resume it, pass --overwrite to start it again, or choose "
                        f"another --name")
    if overwrite:
        _clear(folder)
    else:
        refuse_existing([folder], False, "choose another --name")
    return fresh


def save_manifest(folder, manifest):
    text = json.dumps(manifest, indent=1)
    replace_atomically(str(Path(folder) / MANIFEST), lambda temporary: Path(temporary).write_text(text))


def finetune_best(model, prepared, tuning, context, epochs):
    """Fine-tune for `epochs` and keep the best epoch by val mIoU (epoch 0, the untuned network, included, so
    fine-tuning never makes a variant worse); returns (best epoch, its val mIoU). The batch order follows
    tuning.seed."""
    best = {"epoch": 0, "miou": validation_miou(model, prepared, context.device), "state": None}

    def on_epoch(epoch):
        miou = validation_miou(model, prepared, context.device)
        print(f"  fine-tuning epoch {epoch}/{epochs}: val mIoU {100 * miou:.2f}%", flush=True)
        if miou > best["miou"]:
            best.update(epoch=epoch, miou=miou, state=copy.deepcopy(model.state_dict()))

    if epochs:
        untuned = copy.deepcopy(model.state_dict())
        finetune(model, prepared, tuning, context, epochs, tuning.seed + 1000, on_epoch)
        model.load_state_dict(best["state"] if best["state"] is not None else untuned)
    return best["epoch"], best["miou"]


def score_checkpoint(path, test_set, options):
    """test.py's numbers for a checkpoint: the same loading, BatchNorm folding, loop and metric code."""
    model, metadata = load_for_inference(path, device=options.device, allow_pickle=options.allow_pickle)
    classes = checkpoint_classes(metadata, path)
    model = models.strip_aux_head(model)
    models.fold_batchnorm(model.eval())
    return score_network(model, classes, test_set, options)


def score_network(model, classes, test_set, options):
    """test.py's numbers for a deployed network (a PyTorch one, or an ONNX graph as test.py --weights X.onnx runs
    it): the one evaluation loop and metric code."""
    settings = EvalSettings(classes.num_classes, tolerance_px=options.lt_tolerance, crack_id=classes.crack_id)
    result = evaluate_split(model, test_set, torch.device(options.device), settings, 1, options.workers)
    _, scores, lt = collect_metrics(result, options.lt_tolerance, classes.crack_id)
    crack = classes.crack_id
    return {"test_miou": float(scores["mean_iou"]),
            "crack_iou": float(scores["iou"][crack]) if crack is not None else float("nan"),
            "crack_tolerance_f1": float(lt["lt_f1"]) if crack is not None else float("nan")}


@dataclass
class Study:
    """What every (variant, seed) of one run shares."""
    options: StudyOptions
    folder: Path
    manifest: dict
    context: DistContext
    prepared: object
    dense: torch.nn.Module
    arch: str
    history: list
    source: str
    classes: data.ClassTable = data.S2DS_CLASSES
    test_set: object = None


def seeded_data(prepared, seed, options, context):
    """The shared datasets with Taylor's calibration batches drawn in this seed's order, so a (variant, seed)
    ranks channels on the same batches whatever ran before it (and after a resume)."""
    if prepared.train_set is None:
        return prepared
    loader = train_loader(prepared.train_set, options.batch_size, options.workers, seed, context)
    return dataclasses.replace(prepared, calibration=endless_batches(loader))


def _reusable(path, study):
    """A checkpoint this study saved (same arguments) before it was killed, or None."""
    if not path.is_file():
        return None
    try:
        checkpoint = read_checkpoint(path)
    except UserError:
        return None
    facts = checkpoint.get("study") or {}
    return checkpoint if facts.get("digest") == study.manifest["digest"] else None


def budget_amount(variant, study):
    """{"pruning_ratio"} or {"part_ratios": {part: percent}, "plan", ...} found for a budget variant (plan_budgets),
    {} for the others."""
    key = variant.budget_key if variant is not None else None
    return study.manifest["budgets"][key] if key else {}


def prune_variant(variant, seed, study, path):
    """Prune (variant None: the dense twin, not pruned), fine-tune (best epoch) and save one run; its facts."""
    options, device = study.options, study.context.device
    model = copy.deepcopy(study.dense).to(device)
    amount = budget_amount(variant, study)
    tuning = prune_options(options, variant, seed, amount.get("pruning_ratio"))
    prepared = seeded_data(study.prepared, seed, options, study.context)
    seed_everything(seed)
    history = study.history
    if variant is not None:
        def on_step(step, percent, seconds, _):
            removed = "each part by its planned ratio" if percent is None else f"{percent:g}% of channels"
            print(f"  step {step}/{variant.steps}: {removed} removed so far ({seconds:.0f} s)", flush=True)

        parts = network_parts(model)
        prefixes = {parts[part]: percent for part, percent in amount["part_ratios"].items()} \
            if "part_ratios" in amount else None
        history = history + prune_in_steps(model, tuning, prepared, study.context, on_step, part_ratios=prefixes)
    best_epoch, val_miou = finetune_best(model, prepared, tuning, study.context, options.finetune_epochs)
    macs, params = models.count_macs(model, options.measure_size, device)
    facts = {"best_epoch": best_epoch, "val_miou": val_miou, "macs": macs, "params": params}
    pruning = {} if variant is None else {
        "importance": variant.importance, "p_value": variant.p_value or 2, "iterative_steps": variant.steps,
        "finetune_epochs": tuning.finetune_epochs, "global_pruning": options.global_pruning,
        "round_to": options.round_to, **({"part_ratios": amount["part_ratios"], "target_gmacs": variant.target_gmacs}
                                         if "part_ratios" in amount else {"pruning_ratio": tuning.pruning_ratio})}
    save_atomic(make_checkpoint(
        model, study.arch, study.classes, pruning=history or None, **pruning, source=study.source, measure_size=options.measure_size,
        study={"name": options.name, "digest": study.manifest["digest"], "seed": seed, **facts}), path)
    return facts


def describe(variant, study=None):
    """(variant, criterion, p, ratio, steps, budget, plan, precision, family) of a row; None is the dense
    fine-tuned twin. A budget variant's ratio (uniform) or per-part ratios (plan) come from `study`."""
    float32 = {"precision": "float32", "int8_agreement": None}
    if variant is None:
        return {"variant": TWIN, "criterion": "dense fine-tuned (reference)", "p_value": None, "pruning_ratio": 0.0,
                "steps": 0, "target_gmacs": None, "plan": None, "family": "dense fine-tuned", **float32}
    amount = budget_amount(variant, study) if study is not None else {}
    return {"variant": variant.name, "criterion": variant.importance, "p_value": variant.p_value,
            "pruning_ratio": amount.get("pruning_ratio", variant.ratio), "steps": variant.steps,
            "target_gmacs": variant.target_gmacs, "plan": amount.get("plan"), "family": variant.family, **float32}


def run_variant(variant, seed, study):
    """One (variant, seed) from its checkpoint if this study already saved it, else made now; scored on the test
    split. variant None is the dense fine-tuned twin."""
    described = describe(variant, study)
    key = run_name(described["variant"], seed)
    path = study.folder / f"{key}.pth"
    saved = _reusable(path, study)
    if saved is not None:
        print(f"{key}: reusing {path} (saved before the last run stopped)", flush=True)
        facts = {key: saved["study"][key] for key in ("best_epoch", "val_miou", "macs", "params")}
    else:
        what = ("fine-tuning the dense network" if variant is None else
                f"pruning {variant.name} by {variant.family}")
        print(f"{key}: {what}, seed {seed}", flush=True)
        facts = prune_variant(variant, seed, study, path)
    scores = score_checkpoint(path, study.test_set, study.options)
    print(f"{key}: test mIoU {100 * scores['test_miou']:.2f}%, crack tolerance F1 "
          f"{100 * scores['crack_tolerance_f1']:.2f}%, {facts['macs'] / 1e9:.2f} GMACs", flush=True)
    return {**described, "run": key, "seed": seed, **facts, **scores}


def dense_row(study):
    """The untuned dense network's row: its size and its test scores, from --state_dict as test.py reads it."""
    options = study.options
    macs, params = models.count_macs(study.dense, options.measure_size, study.context.device)
    return {"variant": DENSE, "criterion": "dense, untuned (as trained)", "p_value": None, "pruning_ratio": 0.0,
            "steps": 0, "target_gmacs": None, "plan": None, "precision": "float32", "int8_agreement": None,
            "family": "dense", "best_epoch": None,
            "val_miou": validation_miou(study.dense, study.prepared, study.context.device), "macs": macs,
            "params": params, **score_checkpoint(options.state_dict, study.test_set, options)}


def set_up(options):
    """The study's folder, manifest, data and dense network."""
    folder = Path(options.output_dir) / "studies" / plain_name(options.name, "--name")
    manifest = open_study(folder, study_settings(options), options.overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    save_manifest(folder, manifest)
    context = DistContext(device=torch.device(options.device))
    seed_everything(options.seed)
    dense, arch, history, source, classes = load_for_pruning(options.state_dict, allow_pickle=options.allow_pickle,
                                                             stride=options.output_stride)
    dense.to(context.device)
    prepared = prepare_data(options.tuning_data, prune_options(options, None, options.seed), context)
    require_classes(prepared, classes, source)
    study = Study(options, folder, manifest, context, prepared, dense, arch, history, source, classes)
    if options.test_data:
        study.test_set = data.S2DSDataset(options.test_data, data.EvalTransform(), require_labels=True)
        data.require_same_classes(classes, study.test_set, source)
    return study


def run(options):
    """study.py: the grid (or, with --sensitivity, the per-part sensitivity), resumable; returns the per-seed rows.
    `options` is a StudyOptions."""
    grid = options_grid(options)
    study = set_up(options)
    if options.sensitivity:
        return run_sensitivity(study, grid)
    if study.manifest["dense"] is None:
        study.manifest["dense"] = dense_row(study)
        save_manifest(study.folder, study.manifest)
    plan_budgets(study, grid)
    plan = [(variant, seed) for variant in [None, *grid] for seed in options.seeds]
    jobs = [(variant, seed, False) for variant, seed in plan]  # (variant, seed, its ONNX rows)
    jobs += [(variant, seed, True) for variant, seed in plan if options.wants_int8(describe(variant)["variant"])]
    runs, keys = study.manifest["runs"], []
    for position, (variant, seed, onnx) in enumerate(jobs, start=1):
        name = describe(variant)["variant"]
        wanted = [run_name(name + ONNX, seed), run_name(name + INT8, seed)] if onnx else [run_name(name, seed)]
        keys += wanted
        if all(key in runs for key in wanted):
            print(f"[{position}/{len(jobs)}] {', '.join(wanted)}: finished in an earlier run, reused", flush=True)
            continue
        print(f"[{position}/{len(jobs)}] ", end="")
        if onnx:
            runs.update(onnx_rows(runs[run_name(name, seed)], wanted, study))
        else:
            runs[wanted[0]] = run_variant(variant, seed, study)
        save_manifest(study.folder, study.manifest)
    rows = [{**study.manifest["dense"], "run": DENSE, "seed": seed} for seed in options.seeds]
    rows += [runs[key] for key in keys]
    add_latency(rows, study)
    write_outputs(rows, study)
    return rows


def plan_budgets(study, grid):
    """What each --target_gmacs needs before its variants run, found once and kept in the manifest: the uniform
    ratio of equal GMACs (bisected), and per criterion the per-part plan (pruning.plan_to_budget: each part's
    measured val mIoU drop and cost, greedy), made with the first seed and used by every seed."""
    options, budgets = study.options, study.manifest["budgets"]
    for variant in grid:
        key = variant.budget_key
        if key is None or key in budgets:
            continue
        budget = Budget("gmacs", variant.target_gmacs, options.measure_size, options.device, 0)
        tuning = prune_options(options, variant, options.seed)
        if not variant.budgeted:
            ratio = uniform_ratio_for(budget, study.dense, tuning)
            print(f"{key}: every layer pruned by {ratio:g}% meets {variant.target_gmacs:g} GMACs", flush=True)
            budgets[key] = {"pruning_ratio": ratio}
        else:
            prepared = seeded_data(study.prepared, options.seed, options, study.context)
            planned = plan_to_budget(study.dense, study.arch, tuning, prepared, study.context, budget)
            budgets[key] = {"part_ratios": {part: entry["pruning_ratio"] for part, entry in planned["parts"].items()},
                            "plan": describe_plan(planned), "planned_gmacs": planned["planned_cost"]}
            print(f"{key}: {budgets[key]['plan']} -> {planned['planned_cost']:.3f} GMACs", flush=True)
        save_manifest(study.folder, study.manifest)


def onnx_rows(float_row, keys, study):
    """{key: row} of the two graphs of a finished (variant, seed), made as export.py --int8 makes them (deployed
    network, BatchNorm folded, parity-checked float32 graph, then QDQ INT8 calibrated on --calib_images of
    --val_data) and saved as <key>.onnx: the float32 graph, INT8's control in the same runtime, and the INT8 graph;
    both scored on the test split through onnxruntime as test.py scores an .onnx."""
    options, (onnx_key, int8_key) = study.options, keys
    source = study.folder / f"{float_row['run']}.pth"
    print(f"{int8_key}: exporting {Path(source).name} and quantising it to INT8", flush=True)
    with tempfile.TemporaryDirectory(dir=study.folder, prefix=".tmp_int8_") as folder:
        export = ExportOptions(checkpoint=str(source), output=os.path.join(folder, "float32.onnx"),
                               size=options.measure_size, dynamic=True, int8=True, calib_data=options.val_data,
                               calib_images=options.calib_images, int8_recipe=options.int8_recipe,
                               allow_pickle=options.allow_pickle,
                               device=options.device)
        graph, facts, parity, _ = export_float(export)
        if not parity_passed(parity, False):
            raise UserError(f"the float32 graph of {source} does not match PyTorch in onnxruntime (max abs logit "
                            f"difference {max(row['max_abs_diff'] for row in parity):.2e}), so it is not quantised")
        agreement = export_int8(graph, facts, export)
        os.replace(int8_path(graph), study.folder / f"{int8_key}.onnx")
        os.replace(graph, study.folder / f"{onnx_key}.onnx")
    rows = {}
    kinds = ((onnx_key, ONNX, ONNX_FLOAT, " + ONNX float32"), (int8_key, INT8, "int8", " + INT8"))
    for key, ending, precision, family in kinds:
        scores = score_network(OnnxNetwork(study.folder / f"{key}.onnx", options.device), study.classes,
                               study.test_set, options)
        print(f"{key}: saved {key}.onnx; test mIoU {100 * scores['test_miou']:.2f}%, crack tolerance F1 "
              f"{100 * scores['crack_tolerance_f1']:.2f}%", flush=True)
        rows[key] = {**float_row, **scores, "variant": float_row["variant"] + ending, "run": key,
                     "precision": precision, "family": float_row["family"] + family, "val_miou": None,
                     "int8_agreement": agreement["pixel_agreement"] if precision == "int8" else None}
    return rows


def add_latency(rows, study):
    """Latency of the dense network and of every run's checkpoint as utils.timing measures every latency (the
    deployed network, batch 1, warm-up, median of interleaved rounds, all in this process); speed-up over dense."""
    options = study.options
    if not options.latency_runs:  # not timed: the columns stay, empty
        for row in rows:
            row["latency_ms"] = row["speedup"] = None
        return rows
    paths = {row["run"]: options.state_dict if row["run"] == DENSE else
             study.folder / f"{row['run']}{'.pth' if row['precision'] == 'float32' else '.onnx'}" for row in rows}
    print(f"timing the dense network and {len(paths) - 1} checkpoint(s) at {options.measure_size} px: {WARMUP} "
          f"warm-up forwards each, {options.latency_runs} interleaved rounds, on {device_name(study.context.device)}",
          flush=True)
    networks = (OnnxNetwork(path, options.device) if Path(path).suffix == ".onnx" else
                load_model(path, allow_pickle=options.allow_pickle)[0] for path in paths.values())
    seconds = dict(zip(paths, deployed_latencies(networks, options.measure_size, study.context.device,
                                                 options.latency_runs)))
    for row in rows:
        row["latency_ms"] = 1000 * seconds[row["run"]]
        row["speedup"] = seconds[DENSE] / seconds[row["run"]]
    return rows


# study.csv (headed by key, fractions) and study.xlsx's "per seed" sheet: one row per (variant, seed).
PER_SEED = Schema("study per seed", (
    Column("seed", "seed"), Column("criterion", "criterion"), Column("p_value", "p (norm)"),
    Column("pruning_ratio", "ratio", unit="%"), Column("steps", "steps"), Column("target_gmacs", "GMACs budget"),
    Column("plan", "per-part ratios (budgeted)"), Column("precision", "precision"), Column("gmacs", "GMACs"),
    Column("params_m", "params", unit="M"), Column("latency_ms", "latency", unit="ms"), Column("speedup", "speed-up"),
    Column("test_miou", "test mIoU", percent=True), Column("crack_iou", "crack IoU", percent=True),
    Column("crack_tolerance_f1", "crack tolerance F1", percent=True),
    Column("test_miou_change", "mIoU change vs dense fine-tuned", percent=True),
    Column("crack_tolerance_f1_change", "crack tol. F1 change vs dense fine-tuned", percent=True),
    Column("val_miou", "val mIoU (best epoch)", percent=True), Column("best_epoch", "best epoch"),
    Column("int8_agreement", "INT8 vs float32 pixel agreement (val)", percent=True),
    Column("variant", "variant"), Column("run", "checkpoint")))
# The scores summarised as mean and spread over seeds, and the two compared with the dense fine-tuned twin.
SUMMARISED = ("gmacs", "params_m", "latency_ms", "speedup", "test_miou", "crack_iou", "crack_tolerance_f1",
              "val_miou", "int8_agreement")
COMPARED = ("test_miou", "crack_tolerance_f1")


def table_rows(rows):
    """study.csv's rows: GMACs, params in millions and each score's change against the dense fine-tuned twin of
    the same seed."""
    twins = {row["seed"]: row for row in rows if row["variant"] == TWIN}
    out = []
    for row in rows:
        twin = twins[row["seed"]]
        row = {**row, "gmacs": row["macs"] / 1e9, "params_m": row["params"] / 1e6,
               **{f"{key}_change": row[key] - twin[key] for key in COMPARED}}
        out.append(PER_SEED.taken(row) | {"family": row["family"]})
    return out


def _spread(values):
    """Sample standard deviation over seeds (n - 1); NaN with one seed, where there is no spread to give."""
    values = np.asarray([np.nan if value is None else value for value in values], dtype=float)
    return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")


# Changes are shown to 0.01 percentage points: one that rounds to 0.00 is never called a difference, even where
# every seed gave the same score (zero spread), as a deterministic network's INT8 twin can.
SHOWN_RESOLUTION = 0.00005


def verdict(change, spread, twin_spread):
    """'within noise' when the mean change is no larger than the larger spread of variant and twin over seeds, or
    too small to show in the table."""
    noise = max(spread, twin_spread)
    if np.isnan(noise):
        return "one seed: no spread"
    if abs(change) <= max(noise, SHOWN_RESOLUTION):
        return "within noise"
    return "above dense (beyond noise)" if change > 0 else "below dense (beyond noise)"


def summary_rows(table):
    """study.xlsx's summary and the printed table: per variant the mean and spread (sample standard deviation)
    over seeds of every score, and the mean change against the dense fine-tuned twin with its verdict."""
    frame = pd.DataFrame(table)
    groups = list(frame.groupby("variant", sort=False))
    twin = dict(groups)[TWIN]
    out = []
    for _, members in groups:
        first = members.iloc[0]
        row = {key: first[key] for key in ("criterion", "p_value", "pruning_ratio", "steps", "target_gmacs", "plan",
                                           "precision", "family", "variant")}
        row["seeds"] = len(members)
        for key in SUMMARISED + tuple(f"{key}_change" for key in COMPARED):
            row[f"{key}_mean"] = float(members[key].astype(float).mean())
            row[f"{key}_spread"] = _spread(members[key])
        for key in COMPARED:
            row[f"{key}_verdict"] = ("reference" if first["variant"] == TWIN else
                                     verdict(row[f"{key}_change_mean"], row[f"{key}_spread"],
                                             _spread(twin[key])))
        out.append(row)
    return out


# study.xlsx's summary sheet and the printed table (its columns, labels and "mean ± spread"): per variant.
SUMMARY = Schema("study summary", (
    Column("criterion", "criterion"), Column("p_value", "p (norm)"), Column("pruning_ratio", "ratio", unit="%"),
    Column("steps", "steps"), Column("target_gmacs", "GMACs budget"), Column("plan", "per-part ratios (budgeted)"),
    Column("precision", "precision"), Column("seeds", "seeds"), Column("gmacs_mean", "GMACs"),
    Column("params_m_mean", "params", unit="M"), Column("latency_ms_mean", "latency", unit="ms", label="latency ms"),
    Column("speedup_mean", "speed-up", spread="speedup_spread"), Column("speedup_spread", "speed-up spread"),
    Column("test_miou_mean", "test mIoU", percent=True, spread="test_miou_spread"),
    Column("test_miou_spread", "test mIoU spread", percent=True),
    Column("crack_iou_mean", "crack IoU", percent=True), Column("crack_iou_spread", "crack IoU spread", percent=True),
    Column("crack_tolerance_f1_mean", "crack tolerance F1", percent=True, label="crack tol. F1",
           spread="crack_tolerance_f1_spread"),
    Column("crack_tolerance_f1_spread", "crack tolerance F1 spread", percent=True),
    Column("test_miou_change_mean", "mIoU change vs dense fine-tuned", percent=True, signed=True,
           label="mIoU vs dense ft", spread="test_miou_change_spread"),
    Column("test_miou_change_spread", "mIoU change spread", percent=True),
    Column("test_miou_verdict", "mIoU: vs dense", label="mIoU verdict"),
    Column("crack_tolerance_f1_change_mean", "crack tol. F1 change vs dense fine-tuned", percent=True, signed=True,
           label="crack F1 vs dense ft", spread="crack_tolerance_f1_change_spread"),
    Column("crack_tolerance_f1_change_spread", "crack tol. F1 change spread", percent=True),
    Column("crack_tolerance_f1_verdict", "crack tol. F1: vs dense", label="crack F1 verdict"),
    Column("val_miou_mean", "val mIoU (best epoch)", percent=True),
    Column("int8_agreement_mean", "INT8 vs float32 pixel agreement (val)", percent=True),
    Column("variant", "variant")))
PRINTED_SUMMARY = ("variant", "seeds", "gmacs_mean", "latency_ms_mean", "speedup_mean", "test_miou_mean",
                   "crack_tolerance_f1_mean", "test_miou_change_mean", "test_miou_verdict",
                   "crack_tolerance_f1_change_mean", "crack_tolerance_f1_verdict")


def format_table(summary):
    """The table printed at the end: mean ± spread over seeds; changes are percentage points against the twin."""
    return SUMMARY.format([SUMMARY.taken(row) for row in summary], keys=PRINTED_SUMMARY)


def write_outputs(rows, study):
    """study.csv (per seed, fractions), study_summary.csv (mean and spread), study.xlsx (both, percentages),
    study.png; the summary table printed."""
    table = table_rows(rows)
    summary = summary_rows(table)
    folder, options = study.folder, study.options
    write_csv([PER_SEED.taken(row) for row in table], folder / "study.csv")
    write_csv(summary, folder / "study_summary.csv")
    note = (f"test split {options.test_data}; seeds {', '.join(map(str, options.seeds))}; MACs and latency at "
            f"{options.measure_size}x{options.measure_size} px, batch 1, deployed network, "
            f"{device_name(study.context.device)}; changes are percentage points against the dense network "
            f"fine-tuned like the variants (same epochs, recipe and seed); spread = sample standard deviation over "
            f"seeds; 'within noise' = |mean change| <= the larger spread of the variant and the dense fine-tuned twin, "
            f"or under 0.005 points")
    write_workbook(str(folder / "study.xlsx"), {
        "summary": [SUMMARY.table([SUMMARY.taken(row) for row in summary], title=note)],
        "per seed": [PER_SEED.table([PER_SEED.taken(row) for row in table], title="one row per (variant, seed)")]})
    plot_study(summary, folder / "study.png", f"Pruning study {options.name}", options.measure_size,
               study.context.device.type)
    print(format_table(summary))
    print(f"\nwrote {folder}/: study.csv (one row per seed), study_summary.csv, study.xlsx, study.png and one "
          f"checkpoint per (variant, seed)", flush=True)


def _families(summary):
    """{line label: its rows in ratio order} for the pruned variants."""
    families = {}
    for row in summary:
        if row["variant"] not in (DENSE, TWIN):
            families.setdefault(row["family"], []).append(row)
    return {label: sorted(members, key=lambda row: -row["gmacs_mean"]) for label, members in families.items()}


def _point_label(row):
    """A point's label in study.png: the percent removed, or the budget a per-part plan meets."""
    plan = row.get("plan")
    return f"plan {row['target_gmacs']:g} GMACs" if isinstance(plan, str) else f"{row['pruning_ratio']:g}%"


def _error(row, key):
    spread = row.get(f"{key}_spread", np.nan)
    return 0.0 if spread is None or np.isnan(spread) else spread


def _error_bar(rows, key):
    """matplotlib's yerr in percent: the spread each way, the lower bar cut at 0 (no score is negative)."""
    means = [100 * row[f"{key}_mean"] for row in rows]
    spreads = [100 * _error(row, key) for row in rows]
    return [[min(spread, mean) for spread, mean in zip(spreads, means)], spreads]


def _label_points(axis, points, reach_px=14, levels=6):
    """Write each point's label once and legibly: points within reach_px of each other on the drawn axes
    (collapsed variants that all land on one score) share one label listing their distinct texts, and a label
    that would overprint one already written is lifted a line at a time (up to `levels` lines)."""
    axis.autoscale_view()
    groups = []
    for x, y, text in sorted(points):
        where = axis.transData.transform((x, y))
        near = next((group for group in groups if np.hypot(*(where - group["at"])) <= reach_px), None)
        if near is None:
            groups.append({"at": where, "xy": (x, y), "texts": [text]})
        elif text not in near["texts"]:
            near["texts"].append(text)
    renderer, written = axis.figure.canvas.get_renderer(), []
    for group in groups:
        for level in range(levels):
            label = axis.annotate(", ".join(group["texts"]), group["xy"], textcoords="offset points",
                                  xytext=(4, 4 + 8 * level), fontsize=7)
            box = label.get_window_extent(renderer)
            if level == levels - 1 or not any(box.overlaps(other) for other in written):
                break
            label.remove()
        written.append(box)


def _plot_panel(axis, summary, x_key, y_key):
    """One panel: a line with error bars (spread over seeds) per family, the dense twin's mean ± spread as a grey
    band (a point inside it is within noise of dense), the untuned dense network a black star."""
    by_name = {row["variant"]: row for row in summary}
    twin = by_name[TWIN]
    centre, band = 100 * twin[f"{y_key}_mean"], 100 * _error(twin, y_key)
    axis.axhspan(centre - band, centre + band, color="grey", alpha=0.2, label="dense fine-tuned, mean ± spread")
    axis.axhline(centre, color="grey", linewidth=1)
    points = []
    for label, members in _families(summary).items():
        x = [row[f"{x_key}_mean"] for row in members]
        y = [100 * row[f"{y_key}_mean"] for row in members]
        style = ("s--" if label.endswith("INT8") else "d:" if label.endswith("ONNX float32") else
                 "^-" if "budgeted" in label else "o-")
        axis.errorbar(x, y, yerr=_error_bar(members, y_key), fmt=style, capsize=3, label=label)
        points += [(x_value, y_value, _point_label(row)) for row, x_value, y_value in zip(members, x, y)]
    for name, marker, text in ((DENSE, "k*", "dense, untuned"), (TWIN, "kD", "dense fine-tuned")):
        row = by_name[name]
        axis.errorbar(row[f"{x_key}_mean"], 100 * row[f"{y_key}_mean"], yerr=_error_bar([row], y_key), fmt=marker,
                      markersize=10 if name == DENSE else 7, capsize=3, label=text)
    _label_points(axis, points)


def plot_study(summary, path, title, size, device_type):
    """Test mIoU and crack tolerance F1 (mean, bars: spread over seeds) against GMACs and against latency."""
    with_latency = not np.isnan(summary[0].get("latency_ms_mean", np.nan))
    xs = [("gmacs", f"GMACs per image ({size}x{size} px)")]
    if with_latency:
        xs.append(("latency_ms", f"latency per image (ms, batch 1, {device_type}, deployed)"))
    ys = [("test_miou", "test mIoU (%)"), ("crack_tolerance_f1", "crack tolerance F1 (%)")]
    figure, axes = plt.subplots(len(ys), len(xs), figsize=(6.5 * len(xs), 4.5 * len(ys)), squeeze=False)
    for (y_key, y_label), axis_row in zip(ys, axes):
        for (x_key, x_label), axis in zip(xs, axis_row):
            _plot_panel(axis, summary, x_key, y_key)
            axis.set(xlabel=x_label, ylabel=y_label)
            axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, title_fontsize=8,
                  title="criterion, schedule (point labels: % of channels removed, or the GMACs a per-part plan meets)")
    seeds = summary[0]["seeds"]
    over = (f"mean over {seeds} seeds (bars: spread, cut at 0); inside the grey band = within noise of dense "
            f"fine-tuned" if seeds > 1 else "one seed, so no spread: give --seeds to see the noise")
    figure.suptitle(f"{title}: {over}; up and left is better")
    figure.tight_layout(rect=(0, 0.028 * (len(labels) // 4 + 2), 1, 1))
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


# --- sensitivity: one part of the network pruned at a time, no fine-tuning ---------------------------------

def sensitivity_row(study, variant, part, prefix):
    model = copy.deepcopy(study.dense).to(study.context.device)
    tuning = dataclasses.replace(prune_options(study.options, variant, study.options.seed), finetune_epochs=0)
    seed_everything(study.options.seed)
    prepared = seeded_data(study.prepared, study.options.seed, study.options, study.context)
    prune_in_steps(model, tuning, prepared, study.context, lambda *_: None, layers_outside(model, prefix))
    macs, _ = models.count_macs(model, study.options.measure_size, study.context.device)
    return {"part": part, "pruning_ratio": variant.ratio, "gmacs": macs / 1e9,
            "val_miou": validation_miou(model, study.prepared, study.context.device)}


def run_sensitivity(study, grid):
    """Each part pruned alone at each ratio by the grid's first criterion, scored on --val_data untuned."""
    first = grid[0]
    done = study.manifest["sensitivity"]
    if "dense" not in done:
        done["dense"] = validation_miou(study.dense, study.prepared, study.context.device)
    print(f"sensitivity: each part pruned alone by {first.importance}"
          f"{f' L{first.p_value}' if first.p_value else ''}, no fine-tuning; dense val mIoU "
          f"{100 * done['dense']:.2f}%", flush=True)
    rows = []
    for part, prefix in network_parts(study.dense).items():
        for ratio in dict.fromkeys(study.options.pruning_ratio):
            key = f"{part} @ {float(ratio):g}"
            if key not in done:
                done[key] = sensitivity_row(study, Variant(first.importance, first.p_value, float(ratio), 1), part,
                                            prefix)
                save_manifest(study.folder, study.manifest)
            row = {**done[key], "val_miou_drop": done["dense"] - done[key]["val_miou"]}
            print(f"  {part:<16} {ratio:>5g}%: val mIoU {100 * row['val_miou']:6.2f}% "
                  f"(drop {100 * row['val_miou_drop']:+.2f} points), {row['gmacs']:.2f} GMACs", flush=True)
            rows.append(row)
    write_csv(rows, study.folder / "sensitivity.csv")
    plot_sensitivity(rows, study.folder / "sensitivity.png", study.options.name, first)
    print(f"wrote {study.folder}/sensitivity.csv and sensitivity.png", flush=True)
    return rows


def plot_sensitivity(rows, path, name, variant):
    """Val mIoU drop against the share of channels removed, one line per part: where the network can be cut."""
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    frame = pd.DataFrame(rows)
    for part, members in frame.groupby("part", sort=False):
        axis.plot(members["pruning_ratio"], 100 * members["val_miou_drop"], "o-", label=part)
    axis.axhline(0, color="black", linewidth=0.8)
    norm = f" L{variant.p_value}" if variant.p_value else ""
    axis.set(xlabel="channels removed from that part alone (%)", ylabel="val mIoU drop (percentage points)",
             title=f"{name}: sensitivity of each part ({variant.importance}{norm}, no fine-tuning)\n"
                   f"low lines: the part can be pruned hard; high lines: leave it wider")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, title="part pruned", title_fontsize=8)
    figure.tight_layout()
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)
