"""The pruning study behind study.py: every criterion x p x ratio x schedule pruned, fine-tuned, scored on the test
split as test.py scores it, timed beside the dense network, tabulated and plotted; resumable after a kill.

Floor 6 (docs/ARCHITECTURE.md): the pruning, fine-tuning and validation are utils.pruning's, the scoring is
utils.evaluation's (so study.csv matches test.py to the last digit), the timing utils.deploy's (benchmark.py's
interleaved rounds). This module only walks the grid, keeps the manifest and writes the tables and figures.

Resuming: OUTPUT_DIR/studies/NAME/study.json holds the normalised arguments and every finished variant, replaced
atomically after each one; a variant checkpoint carries the digest of those arguments, so one that was saved but not
yet scored when the run was killed is scored, not pruned again.
"""
import argparse
import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib import pyplot as plt

from utils import data, model as models
from utils.checkpoint import load_for_inference, make_checkpoint, read_checkpoint, save_atomic
from utils.cli import UserError, device_name, plain_name, require_path, resolve_device
from utils.deploy import prepare_variant, time_variants
from utils.distributed import DistContext
from utils.evaluation import collect_metrics, evaluate_split
from utils.files import refuse_existing, replace_atomically
from utils.prune_ops import USES_P_VALUE, importance_name, ratio_fraction
from utils.pruning import finetune, load_for_pruning, prepare_data, prune_in_steps, validation_miou
from utils.recipe import seed_everything
from utils.report import Table, write_csv, write_workbook

MANIFEST = "study.json"
OUTPUT_FILES = ("study.json", "study.csv", "study.xlsx", "study.png", "sensitivity.csv", "sensitivity.png")
# The arguments that make a study what it is; a rerun under the same --name must repeat them.
SETTINGS = ("state_dict", "data", "val_data", "test_data", "importance_type", "p_value", "pruning_ratio",
            "iterative_steps", "global_pruning", "round_to", "finetune_epochs", "step_finetune_epochs",
            "calib_batches", "calib_mode", "batch_size", "crop_size", "lr", "optimizer", "weight_decay", "loss",
            "measure_size", "lt_tolerance", "seed")
PATH_SETTINGS = ("state_dict", "data", "val_data", "test_data")


@dataclass(frozen=True)
class Variant:
    """One cell of the grid: criterion, norm (None where the criterion has none), percent removed, steps."""
    importance: str
    p_value: int | None
    ratio: float
    steps: int

    @property
    def name(self):
        norm = f"_l{self.p_value}" if self.p_value is not None else ""
        return f"{self.importance.lower()}{norm}_{self.ratio:g}pct_{self.steps}step"

    @property
    def family(self):
        """The line it belongs to in study.png: criterion, norm and schedule."""
        norm = f" L{self.p_value}" if self.p_value is not None else ""
        return f"{self.importance}{norm}, {self.steps} step{'s' if self.steps > 1 else ''}"


def variant_grid(args):
    """The variants in the order they run, each checked; a bad value or an empty grid is a one-line UserError."""
    criteria = list(dict.fromkeys(importance_name(name) for name in args.importance_type))
    for ratio in args.pruning_ratio:
        ratio_fraction(ratio)
        if ratio == 0:
            raise UserError("--pruning_ratio 0 prunes nothing; the dense row is in the study anyway")
    for option, lowest in (("p_value", 1), ("iterative_steps", 1)):
        bad = [value for value in getattr(args, option) if value < lowest]
        if bad:
            raise UserError(f"--{option} must be at least {lowest}, got {bad[0]}")
    grid = []
    for importance in criteria:
        norms = list(dict.fromkeys(args.p_value)) if importance in USES_P_VALUE else [None]
        grid += [Variant(importance, p, float(ratio), steps) for p in norms
                 for steps in dict.fromkeys(args.iterative_steps) for ratio in dict.fromkeys(args.pruning_ratio)]
    if not grid:
        raise UserError("the grid is empty: give at least one --importance_type, --pruning_ratio and "
                        "--iterative_steps")
    return grid


def check_args(args):
    """Every check that needs no file, before anything is loaded: one line and exit 2 each."""
    plain_name(args.name, "--name")
    grid = variant_grid(args)
    if any(variant.importance == "Taylor" for variant in grid) and not args.data:
        raise UserError("--importance_type Taylor needs --data TRAIN_DIR: its ranking uses gradients of the real "
                        "loss on training images")
    tuning = args.finetune_epochs > 0 or (args.step_finetune_epochs > 0 and max(args.iterative_steps) > 1)
    if tuning and not args.data:
        raise UserError("fine-tuning (--finetune_epochs, --step_finetune_epochs) needs "
                        "--data TRAIN_DIR; pass --finetune_epochs 0 --step_finetune_epochs 0 to compare untuned")
    if args.finetune_epochs > 0 and not args.val_data:
        raise UserError("--finetune_epochs keeps the best epoch by val mIoU and needs --val_data VAL_DIR")
    if args.sensitivity and not args.val_data:
        raise UserError("--sensitivity scores each part's pruning on --val_data VAL_DIR; pass it")
    if not args.sensitivity and not args.test_data:
        raise UserError("the study scores every variant on --test_data TEST_DIR; pass it")
    for option, lowest in (("finetune_epochs", 0), ("step_finetune_epochs", 0), ("calib_batches", 1),
                           ("crop_size", 8), ("measure_size", 32), ("latency_runs", 0), ("workers", 0),
                           ("lt_tolerance", 0)):
        if getattr(args, option) < lowest:
            raise UserError(f"--{option} must be at least {lowest}, got {getattr(args, option)}")
    if args.batch_size < 2 and args.data:
        raise UserError(f"--batch_size must be at least 2 for BatchNorm in train mode, got {args.batch_size}")
    if args.lr <= 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    args.device = str(resolve_device(args.device))
    return grid


def study_settings(args):
    """The arguments that define the study, normalised (absolute paths, canonical criterion names)."""
    settings = {key: getattr(args, key) for key in SETTINGS}
    for key in PATH_SETTINGS:
        settings[key] = str(Path(settings[key]).resolve()) if settings[key] else None
    settings["state_dict_sha256"] = file_digest(args.state_dict)  # the same path after retraining is another study
    settings["importance_type"] = [importance_name(name) for name in args.importance_type]
    settings["pruning_ratio"] = [float(ratio) for ratio in args.pruning_ratio]
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
    for path in Path(folder).glob("*.pth"):
        path.unlink()
    for name in OUTPUT_FILES:
        if (Path(folder) / name).exists():
            (Path(folder) / name).unlink()


def open_study(folder, settings, overwrite):
    """The manifest to continue (same arguments), or a new one: --overwrite starts again, and other arguments than
    the ones the study was run with need it."""
    manifest_path = Path(folder) / MANIFEST
    fresh = {"settings": settings, "digest": digest(settings), "dense": None, "variants": {}, "sensitivity": {}}
    if manifest_path.is_file() and not overwrite:
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise UserError(f"{manifest_path} is damaged ({str(error).splitlines()[0][:80]}), so the study cannot "
                            f"resume; pass --overwrite to start it again, or choose another --name") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("settings", {}), dict):
            raise UserError(f"{manifest_path} is damaged (not a study manifest), so the study cannot resume; pass "
                            f"--overwrite to start it again, or choose another --name")
        if manifest is not None and manifest.get("settings") == settings:
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


def variant_args(args, variant):
    """torchvision_pruning.py's options for one variant: its --finetune_epochs is the study's per-step fine-tuning,
    done after each step of a schedule of several steps."""
    return argparse.Namespace(**{**vars(args), "importance_type": variant.importance,
                                 "p_value": variant.p_value or 2, "pruning_ratio": variant.ratio,
                                 "iterative_steps": variant.steps,
                                 "finetune_epochs": args.step_finetune_epochs if variant.steps > 1 else 0})


def finetune_best(model, prepared, args, context, epochs):
    """Fine-tune for `epochs` and keep the best epoch by val mIoU (epoch 0, the untuned network, included, so
    fine-tuning never makes a variant worse); returns (best epoch, its val mIoU)."""
    best = {"epoch": 0, "miou": validation_miou(model, prepared, context.device), "state": None}

    def on_epoch(epoch):
        miou = validation_miou(model, prepared, context.device)
        print(f"  fine-tuning epoch {epoch}/{epochs}: val mIoU {100 * miou:.2f}%", flush=True)
        if miou > best["miou"]:
            best.update(epoch=epoch, miou=miou, state=copy.deepcopy(model.state_dict()))

    if epochs:
        untuned = copy.deepcopy(model.state_dict())
        finetune(model, prepared, args, context, epochs, args.seed + 1000, on_epoch)
        model.load_state_dict(best["state"] if best["state"] is not None else untuned)
    return best["epoch"], best["miou"]


def score_checkpoint(path, test_set, args):
    """test.py's numbers for a checkpoint: the same loading, BatchNorm folding, loop and metric code."""
    model, _ = load_for_inference(path, device=args.device, allow_pickle=args.allow_pickle)
    model = models.strip_aux_head(model)
    models.fold_batchnorm(model.eval())
    result = evaluate_split(model, test_set, torch.device(args.device), 1, args.workers,
                            tolerance_px=args.lt_tolerance)
    _, scores, lt = collect_metrics(result, args.lt_tolerance)
    return {"test_miou": float(scores["mean_iou"]), "crack_iou": float(scores["iou"][data.CRACK_ID]),
            "crack_tolerance_f1": float(lt["lt_f1"])}


@dataclass
class Study:
    """What every variant of one run shares."""
    args: argparse.Namespace
    folder: Path
    manifest: dict
    context: DistContext
    prepared: object
    dense: torch.nn.Module
    arch: str
    history: list
    source: str
    test_set: object = None


def _reusable(path, study):
    """A variant checkpoint this study saved (same arguments) before it was killed, or None."""
    if not path.is_file():
        return None
    try:
        checkpoint = read_checkpoint(path)
    except UserError:
        return None
    facts = checkpoint.get("study") or {}
    return checkpoint if facts.get("digest") == study.manifest["digest"] else None


def prune_variant(variant, study, path):
    """Prune, fine-tune (best epoch) and save one variant; returns its facts."""
    args, device = study.args, study.context.device
    model = copy.deepcopy(study.dense).to(device)
    vargs = variant_args(args, variant)
    seed_everything(args.seed)

    def on_step(step, percent, seconds, _):
        print(f"  step {step}/{variant.steps}: {percent:g}% of channels removed so far ({seconds:.0f} s)", flush=True)

    history = study.history + prune_in_steps(model, vargs, study.prepared, study.context, on_step)
    best_epoch, val_miou = finetune_best(model, study.prepared, vargs, study.context, args.finetune_epochs)
    macs, params = models.count_macs(model, args.measure_size, device)
    facts = {"best_epoch": best_epoch, "val_miou": val_miou, "macs": macs, "params": params}
    save_atomic(make_checkpoint(
        model, study.arch, pruning=history, pruning_ratio=variant.ratio, importance=variant.importance,
        p_value=variant.p_value or 2, iterative_steps=variant.steps, finetune_epochs=vargs.finetune_epochs,
        global_pruning=args.global_pruning, round_to=args.round_to, source=study.source,
        measure_size=args.measure_size, study={"name": args.name, "digest": study.manifest["digest"], **facts}),
        path)
    return facts


def run_variant(variant, study):
    """One variant from its checkpoint if this study already saved it, else pruned now; scored on the test split."""
    path = study.folder / f"{variant.name}.pth"
    saved = _reusable(path, study)
    if saved is not None:
        print(f"{variant.name}: reusing {path} (saved before the last run stopped)", flush=True)
        facts = {key: saved["study"][key] for key in ("best_epoch", "val_miou", "macs", "params")}
    else:
        print(f"{variant.name}: pruning {variant.ratio:g}% by {variant.family}", flush=True)
        facts = prune_variant(variant, study, path)
    scores = score_checkpoint(path, study.test_set, study.args)
    print(f"{variant.name}: test mIoU {100 * scores['test_miou']:.2f}%, crack tolerance F1 "
          f"{100 * scores['crack_tolerance_f1']:.2f}%, {facts['macs'] / 1e9:.2f} GMACs", flush=True)
    return {"variant": variant.name, "criterion": variant.importance, "p_value": variant.p_value,
            "pruning_ratio": variant.ratio, "steps": variant.steps, "family": variant.family, **facts, **scores}


def dense_row(study):
    """The dense network's row: its size and its test scores, from --state_dict as test.py reads it."""
    macs, params = models.count_macs(study.dense, study.args.measure_size, study.context.device)
    return {"variant": "dense", "criterion": "dense (unpruned)", "p_value": None, "pruning_ratio": 0.0, "steps": 0,
            "family": "dense", "best_epoch": None, "val_miou": validation_miou(study.dense, study.prepared,
                                                                              study.context.device),
            "macs": macs, "params": params, **score_checkpoint(study.args.state_dict, study.test_set, study.args)}


def set_up(args):
    """The study's folder, manifest, data and dense network."""
    folder = Path(args.output_dir) / "studies" / plain_name(args.name, "--name")
    manifest = open_study(folder, study_settings(args), args.overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    save_manifest(folder, manifest)
    context = DistContext(device=torch.device(args.device))
    seed_everything(args.seed)
    dense, arch, history, source = load_for_pruning(args.state_dict, allow_pickle=args.allow_pickle)
    dense.to(context.device)
    prepared = prepare_data(args, context)
    study = Study(args, folder, manifest, context, prepared, dense, arch, history, source)
    if args.test_data:
        study.test_set = data.S2DSDataset(args.test_data, data.EvalTransform(), require_labels=True)
    return study


def run(args):
    """study.py: the grid (or, with --sensitivity, the per-part sensitivity), resumable; returns the rows."""
    grid = variant_grid(args)
    study = set_up(args)
    if args.sensitivity:
        return run_sensitivity(study, grid)
    if study.manifest["dense"] is None:
        study.manifest["dense"] = dense_row(study)
        save_manifest(study.folder, study.manifest)
    for position, variant in enumerate(grid, start=1):
        if variant.name in study.manifest["variants"]:
            print(f"[{position}/{len(grid)}] {variant.name}: finished in an earlier run, reused", flush=True)
            continue
        print(f"[{position}/{len(grid)}] ", end="")
        study.manifest["variants"][variant.name] = run_variant(variant, study)
        save_manifest(study.folder, study.manifest)
    rows = [study.manifest["dense"]] + [study.manifest["variants"][variant.name] for variant in grid]
    add_latency(rows, study, grid)
    write_outputs(rows, study)
    return rows


def add_latency(rows, study, grid):
    """Median batch-1 latency of the dense network and every variant, deployed as benchmark.py deploys them
    (aux head dropped, BatchNorm folded) and timed in interleaved rounds in this process; speed-up over dense."""
    args = study.args
    if not args.latency_runs:
        return rows
    paths = [args.state_dict] + [study.folder / f"{variant.name}.pth" for variant in grid]
    print(f"timing the dense network and {len(grid)} variant(s) at {args.measure_size} px, {args.latency_runs} "
          f"interleaved rounds on {device_name(study.context.device)}", flush=True)
    variants = [prepare_variant(path, row["variant"], args.measure_size, 1, study.context.device,
                                allow_pickle=args.allow_pickle) for path, row in zip(paths, rows)]
    timed = time_variants(variants, args.latency_runs, 1, study.context.device)
    for row, timing in zip(rows, timed):
        row["latency_ms"] = timing["median_ms"]
        row["speedup"] = timed[0]["median_ms"] / timing["median_ms"]
    return rows


# Columns of study.csv / study.xlsx: (key, header, is a fraction shown in percent).
COLUMNS = (("criterion", "criterion", False), ("p_value", "p (norm)", False), ("pruning_ratio", "ratio (%)", False),
           ("steps", "steps", False), ("gmacs", "GMACs", False), ("params_m", "params (M)", False),
           ("latency_ms", "latency (ms)", False), ("speedup", "speed-up", False), ("test_miou", "test mIoU", True),
           ("crack_iou", "crack IoU", True), ("crack_tolerance_f1", "crack tolerance F1", True),
           ("test_miou_change", "mIoU change vs dense", True),
           ("crack_tolerance_f1_change", "crack tol. F1 change vs dense", True),
           ("val_miou", "val mIoU (best epoch)", True), ("best_epoch", "best epoch", False),
           ("variant", "checkpoint", False))


def table_rows(rows):
    """study.csv's rows: GMACs, params in millions and the change of each score against the dense row."""
    dense = rows[0]
    out = []
    for row in rows:
        row = {**row, "gmacs": row["macs"] / 1e9, "params_m": row["params"] / 1e6,
               "test_miou_change": row["test_miou"] - dense["test_miou"],
               "crack_tolerance_f1_change": row["crack_tolerance_f1"] - dense["crack_tolerance_f1"]}
        out.append({key: row.get(key) for key, _, _ in COLUMNS})
    return out


def format_table(rows):
    """The table printed at the end, scores in percent."""
    shown = [(key, header) for key, header, _ in COLUMNS if key not in ("val_miou", "variant")]
    percent = {key for key, _, is_percent in COLUMNS if is_percent}

    def text(key, value):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "-"
        if key in percent:
            return f"{100 * value:+.2f}" if key.endswith("_change") else f"{100 * value:.2f}%"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    cells = [[header for _, header in shown]] + [[text(key, row.get(key)) for key, _ in shown] for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(shown))]
    return "\n".join("  ".join(f"{cell:<{width}}" if column == 0 else f"{cell:>{width}}"
                               for column, (cell, width) in enumerate(zip(line, widths))) for line in cells)


def write_outputs(rows, study):
    """study.csv (fractions), study.xlsx (percentages), study.png; the table printed."""
    table = table_rows(rows)
    folder = study.folder
    write_csv(table, folder / "study.csv")
    frame = pd.DataFrame(table).rename(columns={key: header for key, header, _ in COLUMNS})
    percent = tuple(header for _, header, is_percent in COLUMNS if is_percent)
    args = study.args
    note = (f"test split {args.test_data}; MACs and latency at {args.measure_size}x{args.measure_size} px, batch 1, "
            f"{device_name(study.context.device)}; changes are percentage points against the dense row")
    write_workbook(str(folder / "study.xlsx"), {"study": [Table(frame, title=note, percent_columns=percent)]})
    plot_study(table, folder / "study.png", f"Pruning study {args.name}", args.measure_size,
               study.context.device.type)
    print(format_table(table))
    print(f"\nwrote {folder}/: study.csv, study.xlsx, study.png and one checkpoint per variant", flush=True)


def _families(rows):
    """{line label: its rows in ratio order} for the variants, the dense row left out."""
    families = {}
    for row in rows[1:]:
        norm = f" L{row['p_value']}" if row["p_value"] is not None else ""
        label = f"{row['criterion']}{norm}, {row['steps']} step{'s' if row['steps'] > 1 else ''}"
        families.setdefault(label, []).append(row)
    return {label: sorted(members, key=lambda row: row["pruning_ratio"]) for label, members in families.items()}


def plot_study(rows, path, title, size, device_type):
    """Test mIoU and crack tolerance F1 against GMACs and against latency, one line per criterion and schedule,
    each point labelled with its ratio, the dense network a black star."""
    with_latency = rows[0].get("latency_ms") is not None
    xs = [("gmacs", f"GMACs per image ({size}x{size} px)")]
    if with_latency:
        xs.append(("latency_ms", f"latency per image (ms, batch 1, {device_type})"))
    ys = [("test_miou", "test mIoU (%)"), ("crack_tolerance_f1", "crack tolerance F1 (%)")]
    figure, axes = plt.subplots(len(ys), len(xs), figsize=(6.5 * len(xs), 4.5 * len(ys)), squeeze=False)
    families = _families(rows)
    for (y_key, y_label), axis_row in zip(ys, axes):
        for (x_key, x_label), axis in zip(xs, axis_row):
            for label, members in families.items():
                x = [row[x_key] for row in members]
                y = [100 * row[y_key] for row in members]
                axis.plot(x, y, "o-", label=label)
                for row, x_value, y_value in zip(members, x, y):
                    axis.annotate(f"{row['pruning_ratio']:g}%", (x_value, y_value), textcoords="offset points",
                                  xytext=(4, 4), fontsize=7)
            dense = rows[0]
            axis.plot(dense[x_key], 100 * dense[y_key], "k*", markersize=14, label="dense (unpruned)")
            axis.annotate("dense", (dense[x_key], 100 * dense[y_key]), textcoords="offset points",
                          xytext=(-10, 8), fontsize=8, fontweight="bold")
            axis.set(xlabel=x_label, ylabel=y_label)
            axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="criterion, schedule (labels: % of channels removed)", title_fontsize=8)
    figure.suptitle(f"{title}: less computation (left) or time (right) against accuracy; up and left is better")
    figure.tight_layout()
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=110, format="png"))
    plt.close(figure)


# --- sensitivity: one part of the network pruned at a time, no fine-tuning ---------------------------------

def network_parts(model):
    """{part: module-name prefix}: each ResNet stage (the whole backbone for other backbones), the ASPP and the
    head's 3x3 convolution."""
    stages = [name for name in ("layer1", "layer2", "layer3", "layer4") if hasattr(model.backbone, name)]
    parts = {f"backbone {name}": f"backbone.{name}" for name in stages} or {"backbone": "backbone"}
    parts.update({"ASPP": "classifier.0", "head 3x3 conv": "classifier.1"})
    return parts


def layers_outside(model, prefix):
    """Every convolution outside `prefix`: ignored by the pruner so only that part loses channels."""
    return [module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Conv2d) and not (name == prefix or name.startswith(prefix + "."))]


def sensitivity_row(study, variant, part, prefix):
    model = copy.deepcopy(study.dense).to(study.context.device)
    vargs = argparse.Namespace(**{**vars(variant_args(study.args, variant)), "finetune_epochs": 0})
    seed_everything(study.args.seed)
    prune_in_steps(model, vargs, study.prepared, study.context, lambda *_: None, layers_outside(model, prefix))
    macs, _ = models.count_macs(model, study.args.measure_size, study.context.device)
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
        for ratio in dict.fromkeys(study.args.pruning_ratio):
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
    plot_sensitivity(rows, study.folder / "sensitivity.png", study.args.name, first)
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
