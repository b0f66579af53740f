"""One study's runs: the dense rows, each (variant, seed) pruned, recalibrated, fine-tuned with the recipe and the
step budget every arm shares, saved and scored on the test split as test.py scores it, the INT8 rows beside their
float32 graphs, and the latency of all of them timed in one process.

Floor 8 (docs/ARCHITECTURE.md): pruning is utils.pruning's, recovery utils.finetune's, scoring utils.evaluation's
(so study.csv matches test.py to the last digit), latency utils.timing's.
"""
import copy
import dataclasses
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from utils import data, model as models
from utils.checkpoint import checkpoint_classes, load_for_inference, load_model, make_checkpoint, read_checkpoint, save_atomic
from utils.cli import UserError, device_name
from utils.deploy import ExportOptions, export_float, export_int8, int8_path, parity_passed
from utils.distributed import DistContext, Launch
from utils.engine import EvalSettings
from utils.evaluation import collect_metrics, evaluate_split
from utils.finetune import endless_batches, finetune, validation_miou
from utils.onnx_model import OnnxNetwork
from utils.prune_ops import network_parts
from utils.pruning import prune_in_steps
from utils.recipe import seed_everything, train_loader
from utils.study.grid import DENSE, INT8, ONNX, ONNX_FLOAT, TWIN, run_name
from utils.study.settings import StudyOptions, prune_options
from utils.study.tables import SCORES
from utils.timing import WARMUP, deployed_latencies


def study_args(options):
    """The recipe a study's checkpoints were fine-tuned with, under its option names (the `args` a checkpoint
    carries, so fine-tuning one of them again settles on the same recipe)."""
    return dataclasses.asdict(options.recipe)


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
    _, scores, tolerance = collect_metrics(result, options.lt_tolerance, classes.crack_id)
    return {key: float(take(scores, tolerance, classes.crack_id)) for key, take in SCORES.items()}


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
    # torchrun's processes, which share the runs out (`context`: this process's own device, a world of one)
    launch: Launch = dataclasses.field(default_factory=Launch)


def seeded_data(prepared, seed, options, context):
    """The shared datasets with Taylor's calibration batches drawn in this seed's order, so a (variant, seed)
    ranks channels on the same batches whatever ran before it (and after a resume)."""
    if prepared.train_set is None:
        return prepared
    loader = train_loader(prepared.train_set, options.recipe.batch_size, options.workers, seed, context)
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
        def on_step(step, percent, seconds, *_):
            removed = "each part by its planned ratio" if percent is None else f"{percent:g}% of channels"
            print(f"  step {step}/{variant.steps}: {removed} removed so far ({seconds:.0f} s)", flush=True)

        parts = network_parts(model)
        prefixes = {parts[part]: percent for part, percent in amount["part_ratios"].items()} \
            if "part_ratios" in amount else None
        history = history + prune_in_steps(model, tuning, prepared, study.context, on_step, part_ratios=prefixes)
    recovery = finetune(model, prepared, tuning.recipe, tuning.finetuning, study.context)
    macs, params = models.count_macs(model, options.measure_size, device)
    facts = {"best_step": recovery.best_step, "val_miou": recovery.val_miou, "macs": macs, "params": params}
    pruning = {} if variant is None else {
        "importance": variant.importance, "p_value": variant.p_value or 2, "iterative_steps": variant.steps,
        "bn_recalibrate": tuning.bn_recalibrate, "finetune_steps": recovery.steps,
        "global_pruning": options.global_pruning,
        "round_to": options.round_to, **({"part_ratios": amount["part_ratios"], "target_gmacs": variant.target_gmacs}
                                         if "part_ratios" in amount else {"pruning_ratio": tuning.pruning_ratio})}
    save_atomic(make_checkpoint(
        model, study.arch, study.classes, pruning=history or None, **pruning, source=study.source,
        measure_size=options.measure_size, args=study_args(options),
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


def run_variant(variant, seed, study, position):
    """One (variant, seed) from its checkpoint if this study already saved it, else made now; scored on the test
    split. variant None is the dense fine-tuned twin; `position` heads its first line ("[3/10, process 1]")."""
    described = describe(variant, study)
    key = run_name(described["variant"], seed)
    path = study.folder / f"{key}.pth"
    saved = _reusable(path, study)
    if saved is not None:
        print(f"{position} {key}: reusing {path} (saved before the last run stopped)", flush=True)
        facts = {key: saved["study"][key] for key in ("best_step", "val_miou", "macs", "params")}
    else:
        what = ("fine-tuning the dense network" if variant is None else
                f"pruning {variant.name} by {variant.family}")
        print(f"{position} {key}: {what}, seed {seed}", flush=True)
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
            "family": "dense", "best_step": None,
            "val_miou": validation_miou(study.dense, study.prepared, study.context.device), "macs": macs,
            "params": params, **score_checkpoint(options.state_dict, study.test_set, options)}


def onnx_rows(float_row, keys, study, position):
    """{key: row} of the two graphs of a finished (variant, seed), made as export.py --int8 makes them (deployed
    network, BatchNorm folded, parity-checked float32 graph, then QDQ INT8 calibrated on --calib_images of
    --val_data) and saved as <key>.onnx: the float32 graph, INT8's control in the same runtime, and the INT8 graph;
    both scored on the test split through onnxruntime as test.py scores an .onnx."""
    options, (onnx_key, int8_key) = study.options, keys
    source = study.folder / f"{float_row['run']}.pth"
    print(f"{position} {int8_key}: exporting {Path(source).name} and quantising it to INT8", flush=True)
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
