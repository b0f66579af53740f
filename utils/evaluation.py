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
from utils.report import (Column, Schema, Table, append_results_row, cell_text, check_results_workbook, plot_confusion,
                          write_workbook)
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
                     "num_classes": network.facts["num_classes"], "class_table": network.facts.get("class_table")}


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


# The per_class sheet and the printed per-class table (widths: the printed table's layout since the first release).
PER_CLASS = Schema("per_class", (
    Column("id", "id"), Column("class", "class", width=15),
    Column("iou", "IoU", percent=True, na="n/a", width=8),
    Column("precision", "precision", percent=True, na="n/a", width=10),
    Column("recall", "recall", percent=True, na="n/a", width=8),
    Column("f1", "F1 (Dice)", percent=True, na="n/a", label="F1", width=8),
    Column("support_pixels", "support pixels", label="pixels", width=13),
    Column("pixel_share", "pixel share", percent=True),
    Column("support_images", "support images", label="images", width=7)))
PRINTED_PER_CLASS = ("class", "iou", "precision", "recall", "f1", "support_pixels", "support_images")
PER_IMAGE = Schema("per_image", (
    Column("index", "index"), Column("image", "image"), Column("miou", "mIoU (per image)", percent=True),
    Column("crack_iou", "crack IoU (per image)", percent=True, optional=True)))


def per_class_rows(scores, classes):
    """One PER_CLASS row per class of ClassTable `classes`."""
    total = max(1, int(scores["support_pixels"].sum()))
    return [PER_CLASS.row(id=i, iou=float(scores["iou"][i]), precision=float(scores["precision"][i]),
                          recall=float(scores["recall"][i]), f1=float(scores["f1"][i]),
                          support_pixels=int(scores["support_pixels"][i]),
                          pixel_share=float(scores["support_pixels"][i] / total),
                          support_images=int(scores["support_images"][i]), **{"class": name})
            for i, name in enumerate(classes.names)]


def per_image_rows(result, dataset):
    """One PER_IMAGE row per scored image (its crack IoU where the class table has a crack)."""
    with_crack = dataset.classes.crack_id is not None
    return [PER_IMAGE.row(index=row["index"], image=dataset.samples[row["index"]].image.name, miou=row["miou"],
                          **({"crack_iou": row["crack_iou"]} if with_crack else {}))
            for row in result.per_image]


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
        "per_class": [PER_CLASS.table(per_class)],
        "per_image": [PER_IMAGE.table(per_image)],
        "confusion_matrix": [
            Table(counts, title="pixel counts (rows: ground truth, columns: prediction)", index=True),
            Table(normalised, title="row-normalised: share of each ground-truth class", index=True,
                  percent_columns=tuple(normalised.columns), color_scale=True)],
    })
    plot_confusion(normalised.to_numpy(), list(normalised.columns), outputs.confusion_png,
                   title=f"{name}: confusion matrix")


# One line of results/model_test_results.xlsx per test.py run; comparison_schema adds one IoU column per class.
COMPARISON = Schema("comparison", (
    Column("name", "name"), Column("date", "date"), Column("checkpoint", "checkpoint"),
    Column("pruned_from", "pruned architecture from"), Column("arch", "arch"), Column("dataset", "dataset"),
    Column("images", "images"), Column("params", "params"), Column("macs_per_image", "MACs per image (all tiles)"),
    Column("image_size", "image size"), Column("eval_size", "eval size", unit="shorter side, px"),
    Column("boundary_ignore", "boundary ignore", unit="px"), Column("tile", "tile", unit="px"),
    Column("stride", "stride", unit="px"), Column("pruning_ratio", "pruning ratio", unit="%"),
    Column("importance", "pruning importance"), Column("miou", "mIoU", percent=True),
    Column("miou_no_background", "mIoU without background", percent=True), Column("classes", "classes"),
    Column("pixel_accuracy", "pixel accuracy", percent=True),
    Column("crack_iou", "crack IoU", percent=True, optional=True),
    Column("crack_f1", "crack F1", percent=True, optional=True),
    Column("lt_iou", "ltIoU", percent=True, optional=True),
    Column("lt_f1", "tolerance F1", percent=True, optional=True),
    Column("lt_tolerance", "lt tolerance", unit="px", optional=True),
    Column("latency_ms", "latency per image", unit="ms"), Column("images_per_second", "images/s"),
    Column("device", "device")))


def comparison_schema(class_names):
    """COMPARISON with an "IoU <class>" column per class of the table, before the timing columns."""
    return COMPARISON.inserted("latency_ms", (Column(f"iou_{name}", f"IoU {name}", percent=True)
                                              for name in class_names))


def comparison_row(options, metadata, facts, device, classes, scores, lt):
    """One row of comparison_schema(classes.names), so pruned variants sit side by side."""
    tiling = options.tiling
    row = {"name": options.name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "checkpoint": _absolute(metadata.get("weights_path", metadata["path"])),
           "pruned_from": _absolute(metadata["path"]) if metadata.get("weights_path") else None,
           "arch": metadata["arch"], "dataset": str(Path(options.test_dir).resolve()),
           "images": facts["images"], "params": facts["params"], "macs_per_image": facts["macs_per_image"],
           "image_size": _size_text(facts["image_size"]), "eval_size": options.eval_size or "native",
           "boundary_ignore": options.boundary_ignore, "tile": tiling.tile,
           "stride": tiling.window_stride if tiling.tile else None,
           "pruning_ratio": facts.get("pruning_ratio"), "importance": facts.get("importance"),
           "miou": scores["mean_iou"], "miou_no_background": scores["mean_iou_no_background"],
           "classes": ", ".join(classes.names), "pixel_accuracy": scores["pixel_accuracy"]}
    if classes.crack_id is not None:
        row.update({"crack_iou": scores["iou"][classes.crack_id], "crack_f1": scores["f1"][classes.crack_id],
                    "lt_iou": lt["lt_iou"], "lt_f1": lt["lt_f1"], "lt_tolerance": options.lt_tolerance})
    row.update({f"iou_{name}": scores["iou"][i] for i, name in enumerate(classes.names)})
    row.update({"latency_ms": 1000 * facts["latency_seconds"], "images_per_second": 1 / facts["latency_seconds"],
                "device": device_name(device)})
    return comparison_schema(classes.names).row(row)


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


# The summary printed as two columns, no headings: each item's value formatted by its own row's percent flag.
PRINTED_SUMMARY = Schema("printed summary", (Column("item", "item"), Column("value", "value")))


def format_summary(summary, per_class):
    """The table printed at the end: per-class scores (PER_CLASS rows), then every overall number."""
    shown = [PRINTED_SUMMARY.row(item=item, value=cell_text(value, is_percent, na="n/a"))
             for item, value, is_percent in summary if item != "classes" and not item.startswith("version:")]
    return (PER_CLASS.format(per_class, keys=PRINTED_PER_CLASS, separator=" ") + "\n\n"
            + PRINTED_SUMMARY.format(shown, headings=False, separator="  "))


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
    data.require_same_classes(classes, dataset, metadata["path"])
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
        per_class = per_class_rows(scores, classes)
        counts, normalised = confusion_frames(result.confusion.matrix.cpu().numpy(), classes.names)
        write_reports(outputs, options.name, summary, per_class, per_image_rows(result, dataset), counts,
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
        schema = comparison_schema(classes.names)
        runs = append_results_row(outputs.comparison, schema.headed(row), schema.percent_headings)
    except UserError as error:
        raise UserError(f"{error} ({outputs.workbook} was written; rerun with --overwrite to add its row)") from None
    print(format_summary(summary, per_class))
    print(f"\nwrote {outputs.workbook} and {outputs.confusion_png.name}"
          + (f", predictions in {outputs.predictions}/" if writer else "")
          + f"; {outputs.comparison} now holds {runs} run(s)", flush=True)
    return result
