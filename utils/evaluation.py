"""test.py's logic: load a checkpoint, score a labelled split, write the workbook and the comparison row.

Every number comes from utils.engine.evaluate's one confusion matrix (and its tolerance counts) through
utils.metrics; this module only gathers them with the facts a thesis table needs (what was evaluated,
how big the network is, how fast it ran, on what) and hands them to utils.report.
"""
import datetime
import importlib.metadata
import os
import platform
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from utils import data
from utils.checkpoint import check_model_options, checkpoint_classes, load_for_inference
from utils.cli import (UserError, cap_workers, check_batch_memory, default_name, device_name, plain_name, require_path,
                       resolve_device)
from utils.distributed import DistContext
from utils.engine import EvalSettings, evaluate
from utils.files import refuse_existing, release, reserve
from utils.model import (Tiling, build, count_macs, count_parameters, fold_batchnorm, strip_aux_head, tile_windows)
from utils.onnx_model import OnnxNetwork, is_onnx_path
from utils.recipe import eval_loader
from utils.report import Table, append_results_row, check_results_workbook, plot_confusion, write_workbook
from utils.timing import deployed_latencies

COMPARISON_WORKBOOK = "model_test_results.xlsx"
# Facts torchvision_pruning.py stores in a pruned checkpoint, with their summary-sheet labels.
PRUNING_FACTS = {"pruning_ratio": "pruning ratio (%)", "importance": "pruning importance", "p_value": "pruning p-norm",
                 "iterative_steps": "pruning steps", "finetune_epochs": "fine-tuning epochs between steps",
                 "global_pruning": "global pruning", "round_to": "channels rounded to"}


@dataclass(frozen=True)
class TestOptions:
    """What test.py's run is made of, built from its command line by cli.options_from and checked when made
    (one-line UserErrors; utils.model.Tiling checks the sliding window). Normalised here and nowhere later:
    `name` defaults to the weights file's (cli.default_name) and `workers` is capped at the usable CPUs."""
    __test__ = False  # a pytest that imports it must not take it for a test class

    test_dir: str
    weights: str | None
    pruned_model: str | None
    use_pruned: bool
    allow_pickle: bool
    output_stride: int | None
    eval_size: int | None
    tiling: Tiling
    boundary_ignore: int
    lt_tolerance: int
    batch_size: int
    amp: bool
    workers: int
    name: str | None
    save_predictions: bool
    output_dir: str
    overwrite: bool
    device: str

    def __post_init__(self):
        check_model_options(self.weights, self.pruned_model, self.use_pruned)
        if str(self.weights).lower().endswith(".onnx") and (self.pruned_model or self.amp):
            raise UserError(f"--weights {self.weights} is an ONNX graph: it is scored as exported, without "
                            f"{'--pruned_model' if self.pruned_model else '--amp'} (its precision was fixed by "
                            f"export.py)")
        if self.batch_size < 1:
            raise UserError(f"--batch_size must be at least 1, got {self.batch_size}")
        if self.eval_size is not None and self.eval_size < 8:
            raise UserError(f"--eval_size must be at least 8 px, got {self.eval_size}")
        for option in ("workers", "boundary_ignore", "lt_tolerance"):
            if getattr(self, option) < 0:
                raise UserError(f"--{option} cannot be negative, got {getattr(self, option)}")
        check_batch_memory(self.tiling.tile_batch, self.tiling.tile, "--tile_batch x --tile")
        object.__setattr__(self, "workers", cap_workers(self.workers))
        object.__setattr__(self, "name", plain_name(self.name or default_name(self.weights or self.pruned_model),
                                                    "--name"))

    def eval_settings(self, classes):
        """The one evaluation loop's settings (utils.engine.evaluate) for this run, on ClassTable `classes`."""
        return EvalSettings(classes.num_classes, self.amp, self.tiling, tolerance_px=self.lt_tolerance,
                            crack_id=classes.crack_id)


@dataclass
class Outputs:
    workbook: Path
    confusion_png: Path
    predictions: Path
    comparison: Path


def output_paths(output_dir, name):
    folder = Path(output_dir) / "test"
    name = plain_name(name, "--name")
    return Outputs(workbook=folder / f"{name}.xlsx", confusion_png=folder / f"{name}_confusion.png",
                   predictions=folder / f"{name}_predictions", comparison=Path(output_dir) / COMPARISON_WORKBOOK)


def refuse_taken(outputs, overwrite, save_predictions):
    """Nothing is silently overwritten: an existing report of this name needs --overwrite."""
    paths = [outputs.workbook, outputs.confusion_png] + ([outputs.predictions] if save_predictions else [])
    refuse_existing(paths, overwrite, "choose another --name")


# Versions come from the installed packages' metadata: torch_pruning.__version__ says 1.6.0 in 1.6.1.
VERSIONED_PACKAGES = ("torch", "torchvision", "torch-pruning", "numpy", "onnxruntime")
MEANS_NOTE = ("over the classes present in the ground truth or the prediction (as mIoU); a precision or "
              "recall with nothing to divide (n/a in per_class) counts as 0 there")


def _versions(device):
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
        versions["cudnn"] = str(torch.backends.cudnn.version())
    return versions


def window_layout(tiling, image_size):
    """(forwards per image, their (height, width)): the whole image, or the windows of a tiled run."""
    if not tiling.tile:
        return 1, tuple(image_size)
    (tops, side_h), (lefts, side_w) = (tile_windows(length, tiling.tile, tiling.window_stride)
                                       for length in image_size)
    return len(tops) * len(lefts), (side_h, side_w)


def macs_per_image(model, tiling, image_size, device):
    """MACs the network spends on one image (of image_size): for a tiled run the sum over all its windows, so
    the figure stands beside the per-image latency."""
    windows, size = window_layout(tiling, image_size)
    return windows * network_macs(model, size, device)


def latency_per_image(model, tiling, image_size, device):
    """Seconds per image as utils.timing measures every latency (deployed network, batch 1, warm-up, median of
    interleaved rounds), times the windows of a tiled run: the same figure benchmark.py and study.py give."""
    windows, size = window_layout(tiling, image_size)
    return windows * deployed_latencies([model], size, device)[0]


def network_macs(model, size, device):
    """MACs of one forward at size: counted on a PyTorch network, from the graph's facts for an ONNX one."""
    return model.macs(size) if isinstance(model, OnnxNetwork) else count_macs(model, size, device=device)[0]


def load_network(options, device):
    """(network, metadata) of TestOptions `options`: a PyTorch checkpoint by load_for_inference's rule, or an ONNX
    graph (--weights X.onnx) run by onnxruntime behind the same module interface, so the one evaluation loop scores
    both."""
    if not is_onnx_path(options.weights):
        return load_for_inference(options.weights, options.pruned_model, options.use_pruned, device,
                                  options.allow_pickle, stride=options.output_stride)
    if options.output_stride is not None:
        raise UserError(f"--output_stride cannot change {options.weights}: an ONNX graph has its stride built in; "
                        f"export the checkpoint again with export.py --output_stride")
    network = OnnxNetwork(options.weights, device)
    return network, {"path": options.weights, "format": f"onnx graph ({network.facts['precision']}, onnxruntime)",
                     "arch": network.facts["arch"], "num_outputs": network.facts["num_classes"],
                     "num_classes": network.facts["num_classes"]}


def model_facts(model, metadata, input_size, device):
    """Parameters and MACs (at input_size, which the facts keep) of the network as evaluated, and how it compares
    with its dense original."""
    if isinstance(model, OnnxNetwork):
        return {"params": model.facts["params"], "macs": model.macs(input_size), "input_size": input_size}
    macs, _ = count_macs(model, input_size, device=device)
    facts = {"params": count_parameters(model), "macs": macs, "input_size": input_size}
    if metadata.get("pruning") or metadata.get("format") == "pickled_model":
        dense = strip_aux_head(build(metadata["arch"], metadata["num_outputs"], init="none")).to(device)
        dense_macs, _ = count_macs(dense, input_size, device=device)
        facts.update(dense_params=count_parameters(dense), dense_macs=dense_macs)
        if metadata.get("pruning"):
            facts["pruning_entries"] = len(metadata["pruning"])
        facts.update({key: metadata[key] for key in PRUNING_FACTS if metadata.get(key) is not None})
    return facts


def evaluate_split(model, dataset, device, settings, batch_size=1, workers=0, on_prediction=None):
    """test.py's evaluation loop (also what scripts/benchmark_eval.py times and the study scores with), per-image
    scores included whatever `settings` says."""
    loader = eval_loader(dataset, batch_size, workers, DistContext(device=device))
    return evaluate(model, loader, device, replace(settings, per_image=True), on_prediction=on_prediction)


def _mean_std(values):
    """nanmean and (population) nanstd, and how many finite values they came from."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    if not finite.size:
        return float("nan"), float("nan"), 0
    return float(finite.mean()), float(finite.std()), int(finite.size)


def collect_metrics(result, tolerance_px, crack_id):
    """Overall metrics as ordered (label, value, is_percent) rows plus the per-class arrays and the crack
    tolerance scores ({} without a crack class: its rows are left out)."""
    try:
        scores = result.confusion.compute()
    except ValueError as error:
        raise UserError(f"nothing to score: {error}") from None
    miou_mean, miou_std, miou_n = _mean_std([row["miou"] for row in result.per_image])
    rows = [
        ("pixel accuracy", scores["pixel_accuracy"], True),
        ("mIoU", scores["mean_iou"], True),
        ("mIoU without background", scores["mean_iou_no_background"], True),
        ("mean F1 (Dice)", scores["mean_f1"], True),
        ("mean precision", scores["mean_precision"], True),
        ("mean recall", scores["mean_recall"], True),
        ("means over classes", MEANS_NOTE, False),
        ("frequency-weighted IoU", scores["fw_iou"], True),
        (f"per-image mIoU, mean over {miou_n} images", miou_mean, True),
        ("per-image mIoU, std (population)", miou_std, True),
    ]
    if crack_id is None:
        return rows, scores, {}
    return rows + _crack_rows(result, scores, tolerance_px, crack_id), scores, result.tolerance.compute()


def _crack_rows(result, scores, tolerance_px, crack):
    """The crack class's own scores: pixel, tolerance (thin-structure) and per-image."""
    lt = result.tolerance.compute()
    crack_mean, crack_std, crack_n = _mean_std([row["crack_iou"] for row in result.per_image])
    return [
        ("crack IoU", scores["iou"][crack], True),
        ("crack F1 (Dice)", scores["f1"][crack], True),
        ("crack precision", scores["precision"][crack], True),
        ("crack recall", scores["recall"][crack], True),
        (f"crack ltIoU ({tolerance_px} px tolerance)", lt["lt_iou"], True),
        (f"crack tolerance F1 ({tolerance_px} px)", lt["lt_f1"], True),
        (f"crack tolerance precision ({tolerance_px} px)", lt["lt_precision"], True),
        (f"crack tolerance recall ({tolerance_px} px)", lt["lt_recall"], True),
        (f"per-image crack IoU, mean over {crack_n} images (crack in label or prediction)", crack_mean, True),
        ("per-image crack IoU, std (population)", crack_std, True),
    ]


LATENCY_LABEL = "latency per image (ms, deployed network, batch 1, median)"


def timing_rows(result, latency_seconds):
    return [
        (LATENCY_LABEL, 1000 * latency_seconds, False),
        ("images per second (deployed network, batch 1)", 1 / latency_seconds, False),
        ("images per second (whole loop, with data and metrics)", result.images / max(result.seconds, 1e-12), False),
        ("evaluation time (s)", result.seconds, False),
    ]


def _absolute(path):
    return str(Path(path).resolve())


def _size_text(size):
    return f"{size[1]}x{size[0]}"


def summary_rows(options, metadata, facts, dataset, device, measured, scores):
    """The summary sheet as (item, value, is_percent) rows, in reading order; `measured`: the metric and timing
    rows (collect_metrics, timing_rows)."""
    tiling = options.tiling
    rows = [("name", options.name, False), ("date", datetime.datetime.now().isoformat(timespec="seconds"), False)]
    if metadata.get("weights_path"):
        rows += [("weights", _absolute(metadata["weights_path"]), False),
                 ("pruned architecture from", _absolute(metadata["path"]), False)]
    else:
        rows.append(("checkpoint", _absolute(metadata["path"]), False))
    rows += [("checkpoint format", metadata.get("format"), False), ("arch", metadata["arch"], False),
             ("classes", ", ".join(dataset.classes.names), False), ("model outputs", metadata["num_outputs"], False),
             ("params (aux head dropped)", facts["params"], False),
             (f"MACs per {'tile' if tiling.tile else 'image'} at {_size_text(facts['input_size'])}", facts["macs"],
              False),
             (f"MACs per image at {_size_text(facts['image_size'])} (all tiles)", facts["macs_per_image"], False)]
    if "pruning_entries" in facts:
        rows.append(("pruning history entries (channel groups removed)", facts["pruning_entries"], False))
    if "dense_params" in facts:
        rows += [("params vs dense", facts["params"] / facts["dense_params"], True),
                 ("MACs vs dense", facts["macs"] / facts["dense_macs"], True)]
        rows += [(label, facts[key], False) for key, label in PRUNING_FACTS.items() if key in facts]
    rows += [("dataset", str(dataset.root.resolve()), False), ("images", len(dataset), False),
             ("labelled pixels", scores["labelled_pixels"], False),
             ("evaluation size", f"shorter side {options.eval_size} px" if options.eval_size else "native", False),
             ("sliding window", f"tile {tiling.tile}, stride {tiling.window_stride}" if tiling.tile else "no", False),
             ("boundary ignore (px)", options.boundary_ignore, False),
             ("ltIoU tolerance (px)", options.lt_tolerance, False),
             ("mixed precision", bool(options.amp), False), ("batch size", options.batch_size, False)]
    rows += measured
    rows += [("device", str(device), False), ("device name", device_name(device), False)]
    rows += [(f"version: {key}", value, False) for key, value in _versions(device).items()]
    return rows


def per_class_frame(scores, classes):
    total = max(1, int(scores["support_pixels"].sum()))
    return pd.DataFrame({
        "id": range(classes.num_classes), "class": classes.names, "IoU": scores["iou"],
        "precision": scores["precision"], "recall": scores["recall"], "F1 (Dice)": scores["f1"],
        "support pixels": scores["support_pixels"], "pixel share": scores["support_pixels"] / total,
        "support images": scores["support_images"]})


def per_image_frame(result, dataset):
    columns = {
        "index": [row["index"] for row in result.per_image],
        "image": [dataset.samples[row["index"]].image.name for row in result.per_image],
        "mIoU (per image)": [row["miou"] for row in result.per_image]}
    if dataset.classes.crack_id is not None:
        columns["crack IoU (per image)"] = [row["crack_iou"] for row in result.per_image]
    return pd.DataFrame(columns)


def confusion_frames(matrix, names):
    counts = pd.DataFrame(matrix, index=pd.Index(names, name="ground truth \\ prediction"), columns=names)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = matrix / matrix.sum(axis=1, keepdims=True)
    return counts, pd.DataFrame(normalised, index=counts.index, columns=names)


def write_reports(outputs, name, summary, per_class, per_image, counts, normalised):
    percent_rows = tuple(i for i, (_, _, percent) in enumerate(summary) if percent)
    summary_frame = pd.DataFrame([(item, value) for item, value, _ in summary], columns=["item", "value"])
    write_workbook(outputs.workbook, {
        "summary": [Table(summary_frame, percent_rows=percent_rows)],
        "per_class": [Table(per_class, percent_columns=("IoU", "precision", "recall", "F1 (Dice)", "pixel share"))],
        "per_image": [Table(per_image, percent_columns=("mIoU (per image)", "crack IoU (per image)"))],
        "confusion_matrix": [
            Table(counts, title="pixel counts (rows: ground truth, columns: prediction)", index=True),
            Table(normalised, title="row-normalised: share of each ground-truth class", index=True,
                  percent_columns=tuple(normalised.columns), color_scale=True)],
    })
    plot_confusion(normalised.to_numpy(), list(normalised.columns), outputs.confusion_png,
                   title=f"{name}: confusion matrix")


def comparison_row(options, metadata, facts, device, classes, scores, lt):
    """One line of results/model_test_results.xlsx, so pruned variants sit side by side."""
    tiling = options.tiling
    row = {"name": options.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "checkpoint": _absolute(metadata.get("weights_path", metadata["path"])),
           "pruned architecture from": _absolute(metadata["path"]) if metadata.get("weights_path") else None,
           "arch": metadata["arch"], "dataset": str(Path(options.test_dir).resolve()),
           "images": facts["images"], "params": facts["params"],
           "MACs per image (all tiles)": facts["macs_per_image"], "image size": _size_text(facts["image_size"]),
           "eval size (shorter side, px)": options.eval_size or "native",
           "boundary ignore (px)": options.boundary_ignore,
           "tile (px)": tiling.tile, "stride (px)": tiling.window_stride if tiling.tile else None,
           "pruning ratio (%)": facts.get("pruning_ratio"), "pruning importance": facts.get("importance"),
           "mIoU": scores["mean_iou"],
           "mIoU without background": scores["mean_iou_no_background"],
           "classes": ", ".join(classes.names), "pixel accuracy": scores["pixel_accuracy"]}
    if classes.crack_id is not None:
        row.update({"crack IoU": scores["iou"][classes.crack_id], "crack F1": scores["f1"][classes.crack_id],
                    "ltIoU": lt["lt_iou"], "tolerance F1": lt["lt_f1"], "lt tolerance (px)": options.lt_tolerance})
    row.update({f"IoU {name}": scores["iou"][i] for i, name in enumerate(classes.names)})
    row.update({"latency per image (ms)": 1000 * facts["latency_seconds"], "images/s": 1 / facts["latency_seconds"],
                "device": device_name(device)})
    return row


def comparison_percent(row):
    """The comparison row's columns that hold fractions shown as percentages."""
    return tuple(key for key in row if key in ("mIoU", "mIoU without background", "crack IoU", "crack F1", "ltIoU",
                                               "tolerance F1", "pixel accuracy") or key.startswith("IoU "))


class PredictionWriter:
    """Saves each predicted mask as a grayscale class-id PNG named like its image, in a folder that only
    replaces the old one once the evaluation has finished."""

    def __init__(self, dataset, folder):
        self.dataset, self.folder = dataset, Path(folder)
        self.partial = self.folder.with_name(f".{self.folder.name}.partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)

    def __call__(self, index, prediction):
        mask = prediction.to(torch.uint8).cpu().numpy()
        Image.fromarray(mask).save(self.partial / f"{self.dataset.samples[index].name}.png")

    def discard(self):
        shutil.rmtree(self.partial, ignore_errors=True)

    def finish(self):
        if self.folder.exists():
            shutil.rmtree(self.folder)
        os.replace(self.partial, self.folder)


def format_summary(summary, per_class):
    """The table printed at the end: per-class scores, then every overall number."""
    lines = [f"{'class':<15}{'IoU':>9}{'precision':>11}{'recall':>9}{'F1':>9}{'pixels':>14}{'images':>8}"]

    def percent(value):
        return "     n/a" if np.isnan(value) else f"{100 * value:7.2f}%"

    for row in per_class.to_dict("records"):
        lines.append(f"{row['class']:<15}{percent(row['IoU']):>9}{percent(row['precision']):>11}"
                     f"{percent(row['recall']):>9}{percent(row['F1 (Dice)']):>9}{row['support pixels']:>14,d}"
                     f"{row['support images']:>8d}")
    lines.append("")
    shown = [row for row in summary if row[0] != "classes" and not row[0].startswith("version:")]
    width = max(len(item) for item, _, _ in shown)
    for item, value, is_percent in shown:
        if is_percent:
            text = percent(value).strip()
        elif isinstance(value, float):
            text = f"{value:,.2f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,d}"
        else:
            text = str(value)
        lines.append(f"{item:<{width}}  {text}")
    return "\n".join(lines)


def run(options):
    """test.py: evaluate one checkpoint on one labelled split (TestOptions `options`) and write its reports."""
    device = resolve_device(options.device)
    outputs = output_paths(options.output_dir, options.name)
    refuse_taken(outputs, options.overwrite, options.save_predictions)
    check_results_workbook(outputs.comparison)
    require_path(options.test_dir, "test folder", "dir")
    dataset = data.S2DSDataset(options.test_dir, data.EvalTransform(options.eval_size), require_labels=True,
                               boundary_px=options.boundary_ignore)
    model, metadata = load_network(options, device)
    classes = checkpoint_classes(metadata, metadata["path"])
    if classes != dataset.classes:
        raise UserError(f"{metadata['path']} predicts {classes.num_classes} classes ({', '.join(classes.names)}) "
                        f"but {dataset.root} has {dataset.classes.num_classes} ({', '.join(dataset.classes.names)}); "
                        f"score it on data of its own classes")
    model = strip_aux_head(model)
    tiling = options.tiling
    input_size = (tiling.tile, tiling.tile) if tiling.tile else tuple(dataset[0][0].shape[-2:])
    facts = model_facts(model, metadata, input_size, device)
    facts["image_size"] = tuple(dataset[0][0].shape[-2:])
    facts["macs_per_image"] = macs_per_image(model, tiling, facts["image_size"], device)
    fold_batchnorm(model.eval())  # after counting: the facts are the checkpoint's network, the speed the folded one's
    writer = PredictionWriter(dataset, outputs.predictions) if options.save_predictions else None
    print(f"evaluating {metadata['arch']} from {metadata['path']} on {dataset.root} ({len(dataset)} images, "
          f"{device_name(device)})", flush=True)
    if not options.overwrite:  # claimed atomically: of two runs with the same --name, the second is refused
        reserve(outputs.workbook, "another test.py run has this --name; choose another --name")
    try:
        result = evaluate_split(model, dataset, device, options.eval_settings(classes), options.batch_size,
                                options.workers, writer)
        metric_rows, scores, lt = collect_metrics(result, options.lt_tolerance, classes.crack_id)
        facts["images"] = result.images
        facts["latency_seconds"] = latency_per_image(model, tiling, facts["image_size"], device)
        summary = summary_rows(options, metadata, facts, dataset, device,
                               metric_rows + timing_rows(result, facts["latency_seconds"]), scores)
        per_class = per_class_frame(scores, classes)
        counts, normalised = confusion_frames(result.confusion.matrix.cpu().numpy(), classes.names)
        write_reports(outputs, options.name, summary, per_class, per_image_frame(result, dataset), counts,
                      normalised)
        if writer is not None:
            writer.finish()
    except BaseException:
        if writer is not None:
            writer.discard()  # a failed run leaves the earlier predictions as they were
        release(outputs.workbook)  # and no empty workbook that would block the same command
        raise
    try:
        row = comparison_row(options, metadata, facts, device, classes, scores, lt)
        runs = append_results_row(outputs.comparison, row, comparison_percent(row))
    except UserError as error:
        raise UserError(f"{error} ({outputs.workbook} was written; rerun with --overwrite to add its row)") from None
    print(format_summary(summary, per_class))
    print(f"\nwrote {outputs.workbook} and {outputs.confusion_png.name}"
          + (f", predictions in {outputs.predictions}/" if writer else "")
          + f"; {outputs.comparison} now holds {runs} run(s)", flush=True)
    return result
