"""Deployment: ONNX export checked against PyTorch with onnxruntime, and speed/size measurements of variants.

export.py and benchmark.py are front doors to this module. The exported graph is the inference
network only: one tensor of main-head logits (no dict, no auxiliary head, no thesis 8th channel),
so TensorRT's trtexec builds an engine from it directly.
"""
import copy
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import pyplot as plt
from torch import nn
from tqdm import tqdm

from utils import data
from utils.checkpoint import checkpoint_classes, load_model
from utils.cli import (UserError, default_name, device_name, options_from, plain_name, progress_enabled,
                       require_path, resolve_device)
from utils.distributed import DistContext
from utils.engine import EvalSettings, evaluate
from utils.files import refuse_existing, replace_atomically
from utils.model import count_macs, fold_batchnorm, forward_logits, strip_aux_head
from utils.onnx_model import (INPUT_NAME, OUTPUT_NAME, OnnxNetwork, facts_metadata, is_onnx_path, onnx_input,
                              onnx_session)
from utils.quantize import (Int8Recipe, calibration_feeds, calibration_set, check_calibration_split,
                            prediction_agreement, quantize_int8)
from utils.recipe import eval_loader
from utils.report import write_csv
from utils.timing import WARMUP, forward_times, interleaved_times, time_calls

# A float32 graph's logits may differ from PyTorch's by FLOAT32_ATOL + FLOAT32_RTOL x the largest |logit| of the
# same images (torch.testing's atol + rtol form, the scale taken over the tensor: float32 rounding in a deep network
# grows with the magnitudes summed, so a logit near 0 beside logits of 4e4 carries their error: 2e-2 measured on the
# demo network, 5e-6 of the largest logit on a MobileNet whose head was scaled up); float16 graphs are judged by
# argmax only. A wrong graph misses by far more than 1e-4 of the scale (tests/test_deploy.py).
FLOAT32_ATOL, FLOAT32_RTOL = 1e-3, 1e-4
MIN_AGREEMENT = {False: 0.999, True: 0.98}  # argmax agreement by --half; float16 rounding flips near-ties
INT8_TARGET_AGREEMENT = 0.98  # INT8 vs float32 pixel agreement export.py --int8 reports against (issue 19)
PARITY_RULE = {False: f"max abs logit diff <= {FLOAT32_ATOL:g} + {FLOAT32_RTOL:g} x max abs logit and argmax "
                      f"agreement >= 99.9%",
               True: "argmax agreement >= 98% (float16)"}
# The legacy TorchScript exporter works without onnxscript (which the dynamo exporter needs) but warns.
_EXPORTER_WARNINGS = (".*legacy TorchScript-based ONNX export.*", ".*feature will be removed.*")


class LogitsOnly(nn.Module):
    """The network as deployed: image batch in, main-head logits (N, classes, H, W) out."""

    def __init__(self, model, num_classes):
        super().__init__()
        self.model = strip_aux_head(model)
        self.num_classes = num_classes

    def forward(self, image):
        return forward_logits(self.model, image, self.num_classes)


def export_onnx(network, path, size=512, batch=1, dynamic=False, opset=17, facts=None):
    """Trace a LogitsOnly network into an ONNX file (written atomically) and validate it with onnx.checker.

    dynamic: batch, height and width become free axes (one file for every photo size). facts (arch, params,
    MACs, ...) go into the graph's metadata, so test.py and benchmark.py can describe the graph on its own.
    """
    import onnx

    parameter = next(network.parameters())
    example = torch.randn(batch, 3, size, size, device=parameter.device, dtype=parameter.dtype)
    axes = {0: "batch", 2: "height", 3: "width"}
    dynamic_axes = {INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None

    def write(temporary):
        with warnings.catch_warnings():
            for message in _EXPORTER_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(network.eval(), (example,), temporary, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                              do_constant_folding=True)
        if facts:
            add_facts(temporary, facts)
        onnx.checker.check_model(temporary)

    replace_atomically(str(path), write)
    return Path(path)


def add_facts(path, facts):
    """Store facts (utils.onnx_model.FACT_TYPES) in the ONNX file's metadata_props, in place."""
    import onnx

    graph = onnx.load(str(path))
    del graph.metadata_props[:]
    for key, value in facts_metadata(facts):
        graph.metadata_props.add(key=key, value=value)
    onnx.save(graph, str(path))


@torch.no_grad()
def check_parity(reference, onnx_path, shapes, device="cpu", seed=0):
    """onnxruntime vs the float32 PyTorch network on random normalised images of each (batch, H, W) shape.

    Returns one dict per shape: max and mean absolute logit difference, the largest logit (for scale)
    and the share of pixels whose argmax class agrees.
    """
    session = onnx_session(onnx_path, device)
    generator = torch.Generator().manual_seed(seed)
    parameter = next(reference.parameters())
    rows = []
    for batch, height, width in shapes:
        image = torch.randn(batch, 3, height, width, generator=generator)
        expected = reference(image.to(parameter.device, parameter.dtype)).float().cpu().numpy()
        actual = session.run([OUTPUT_NAME], onnx_input(session, image))[0].astype(np.float32)
        if actual.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {actual.shape} differs from PyTorch's {expected.shape}")
        difference = np.abs(actual - expected)
        rows.append({"shape": f"{batch}x3x{height}x{width}", "max_abs_diff": float(difference.max()),
                     "mean_abs_diff": float(difference.mean()), "max_abs_logit": float(np.abs(expected).max()),
                     "argmax_agreement": float((actual.argmax(1) == expected.argmax(1)).mean())})
    return rows


def parity_passed(rows, half):
    """float32: on every shape, max abs logit difference <= FLOAT32_ATOL + FLOAT32_RTOL x that shape's largest
    |logit|, and >= 99.9% argmax agreement; float16: >= 98% agreement."""
    agreement = min(row["argmax_agreement"] for row in rows) >= MIN_AGREEMENT[half]
    close = half or all(row["max_abs_diff"] <= FLOAT32_ATOL + FLOAT32_RTOL * row["max_abs_logit"] for row in rows)
    return agreement and close


def trtexec_command(onnx_path, size, dynamic, int8=False):
    """The line that builds a TensorRT engine from the ONNX file on the Jetson itself: float16, or for a QDQ
    graph int8 with explicit quantisation (--int8; --fp16 lets the layers left in float, such as the resize,
    run in float16 rather than float32)."""
    engine = Path(onnx_path).with_suffix(".engine").name
    command = f"trtexec --onnx={Path(onnx_path).name} {'--int8 --fp16' if int8 else '--fp16'} --saveEngine={engine}"
    if dynamic:
        shape = "{}:1x3x{}x{}"
        command += (f" --minShapes={shape.format(INPUT_NAME, size // 2, size // 2)}"
                    f" --optShapes={shape.format(INPUT_NAME, size, size)}"
                    f" --maxShapes={shape.format(INPUT_NAME, 2 * size, 2 * size)}")
    return command


def int8_path(output):
    """Where --int8 writes the quantised graph: beside the float32 one, named <stem>_int8.onnx."""
    return Path(output).with_name(f"{Path(output).stem}_int8.onnx")


def graph_facts(network, metadata, size, precision, source):
    """What the ONNX file says about itself (utils.onnx_model.FACT_TYPES), counted on the unfolded network."""
    macs, params = count_macs(network, size, device=next(network.parameters()).device)
    facts = {"arch": metadata["arch"], "num_classes": metadata["num_classes"], "pruned": bool(metadata.get("pruning")),
             "params": params, "macs": macs, "macs_size": size, "precision": precision, "source": str(source)}
    try:
        facts["class_table"] = checkpoint_classes(metadata, str(source)).rows()
    except UserError:  # a thesis file of another class count: its graph, like it, is refused by test.py
        pass
    return facts


def _print_parity(rows):
    for row in rows:
        print(f"onnxruntime vs PyTorch (float32) on {row['shape']}: max abs logit diff {row['max_abs_diff']:.2e} "
              f"(logits up to {row['max_abs_logit']:.3g}), mean {row['mean_abs_diff']:.2e}, argmax agreement "
              f"{100 * row['argmax_agreement']:.3f}%")


def export_int8(fp32_path, facts, options):
    """Quantise the float32 graph at fp32_path to int8_path(fp32_path) (QDQ INT8 by options.int8_recipe,
    utils.quantize), calibrated on up to options.calib_images images of the split options.calib_data at the
    export size, and print how far its predictions agree with the float32 graph's on every image of that split."""
    output, size, device = int8_path(fp32_path), options.size, options.device
    reference = onnx_session(fp32_path, device)
    batch = reference.get_inputs()[0].shape[0]
    batch = batch if isinstance(batch, int) else 1
    dataset = calibration_set(options.calib_data, size)
    feeds = calibration_feeds(dataset, options.calib_images, size, batch, reference)
    quantised = []

    def write(temporary):
        quantised.append(quantize_int8(fp32_path, temporary, feeds, options.int8_recipe))
        add_facts(temporary, {**facts, "precision": "int8", "int8_target": options.int8_recipe.int8_target})

    replace_atomically(str(output), write)
    seconds, kept = quantised[0]
    print(f"wrote {output} ({os.path.getsize(output) / 2**20:.1f} MB, int8: {options.int8_recipe.describe()}; "
          f"calibrated on {len(feeds) * batch} image(s) of {dataset.root} at {size}x{size}) in {seconds:.1f} s")
    if kept:
        print(f"kept in float (quantising each alone cost the most agreement on the calibration images): "
              f"{', '.join(kept)}")
    agreement = prediction_agreement(reference, onnx_session(output, device), dataset, size, batch,
                                     facts["num_classes"])
    verdict = "meets" if agreement["pixel_agreement"] >= INT8_TARGET_AGREEMENT else "is BELOW"
    print(f"INT8 vs float32 predictions on {agreement['images']} image(s) of {dataset.root} at {size}x{size}: "
          f"pixel agreement {100 * agreement['pixel_agreement']:.2f}% ({verdict} the "
          f"{100 * INT8_TARGET_AGREEMENT:.0f}% target), mIoU {100 * agreement['miou']:.2f}% (float32's classes as "
          f"ground truth)")
    return agreement


def _resolved_device(spec):
    """--device's text (auto, cpu, cuda, cuda:N) as the torch.device it names, set once while the spec is made."""
    object.__setattr__(spec, "device", resolve_device(spec.device))


@dataclass(frozen=True)
class ExportOptions:
    """What export.py's run needs, checked when made: the checkpoint and the graph's file (`output`; None:
    OUTPUT_DIR/export/<checkpoint name>.onnx, see onnx_path), its input (size x size, batch, free axes with
    `dynamic`), opset and precision, and with `int8` the split and image count that calibrate the INT8 graph
    and how it is quantised (int8_recipe: utils.quantize.Int8Recipe)."""
    checkpoint: str
    output: str | None = None
    output_dir: str = "results"
    overwrite: bool = False
    size: int = 512
    batch: int = 1
    dynamic: bool = False
    opset: int = 17
    half: bool = False
    int8: bool = False
    calib_data: str | None = None
    calib_images: int = 16
    int8_recipe: Int8Recipe = field(default_factory=Int8Recipe)
    allow_pickle: bool = False
    output_stride: int | None = None
    device: torch.device | str = "auto"

    def __post_init__(self):
        if self.size < 32 or self.size % 8:
            raise UserError(f"--size must be a multiple of 8, at least 32, got {self.size}")
        if self.batch < 1:
            raise UserError(f"--batch must be at least 1, got {self.batch}")
        if not 11 <= self.opset <= 20:
            raise UserError(f"--opset must be between 11 and 20, got {self.opset}")
        require_path(self.checkpoint, "checkpoint", "file")
        self._check_int8()
        if self.onnx_path.suffix.lower() != ".onnx":
            raise UserError(f"--output should end in .onnx, got {self.onnx_path}")
        refuse_existing([self.onnx_path] + ([int8_path(self.onnx_path)] if self.int8 else []), self.overwrite,
                        "choose another --output")
        _resolved_device(self)

    def _check_int8(self):
        """--int8 needs a split of images to calibrate on; its flags mean nothing without it."""
        if self.int8 and self.half:
            raise UserError("--int8 and --half are two different graphs: drop --half (INT8 is quantised from "
                            "float32)")
        if self.int8 and not self.calib_data:
            raise UserError("--int8 needs --calib_data SPLIT (a folder with Images/, e.g. the val split) to "
                            "calibrate the activation ranges on")
        if self.calib_data and not self.int8:
            raise UserError("--calib_data is only used with --int8; add --int8 or drop --calib_data")
        if self.int8_recipe != Int8Recipe() and not self.int8:
            raise UserError("--int8_target, --int8_weights, --int8_reduce_range, --int8_calibration and "
                            "--int8_float_layers are only used with --int8; add --int8 or drop them")
        if self.int8 and self.opset < 13:
            raise UserError(f"--int8 needs --opset 13 or later (per-channel QuantizeLinear), got {self.opset}")
        if self.calib_images < 1:
            raise UserError(f"--calib_images must be at least 1, got {self.calib_images}")
        if self.int8:
            require_path(self.calib_data, "--calib_data split", "dir")
            check_calibration_split(self.calib_data, 1 if self.dynamic else self.batch)

    @property
    def onnx_path(self):
        """The float32 (or --half float16) graph's file: --output, or OUTPUT_DIR/export/<checkpoint name>.onnx."""
        return Path(self.output or Path(self.output_dir) / "export" / f"{default_name(self.checkpoint)}.onnx")

    @property
    def precision(self):
        return "float16" if self.half else "float32"


def export_float(options):
    """Trace the checkpoint's deployed network (BatchNorm folded) to options.onnx_path and compare onnxruntime with
    PyTorch on it: (path, the graph's facts, parity rows, seconds the export took). What export.py and the study's
    INT8 rows share."""
    output, device, size, batch = options.onnx_path, options.device, options.size, options.batch
    model, metadata = load_model(options.checkpoint, device=device, allow_pickle=options.allow_pickle,
                                 stride=options.output_stride)
    reference = LogitsOnly(model, metadata["num_classes"]).eval()
    facts = graph_facts(reference, metadata, size, options.precision, options.checkpoint)
    fold_batchnorm(reference)
    network = copy.deepcopy(reference).half() if options.half else reference
    started = time.perf_counter()
    export_onnx(network, output, size, batch, options.dynamic, options.opset, facts)
    seconds = time.perf_counter() - started
    shapes = [(batch, size, size)]
    if options.dynamic:
        shapes.append((batch + 1, size // 2, size * 3 // 4))
    with torch.no_grad():
        rows = check_parity(reference, output, shapes, device)
    return output, facts, rows, seconds


def run_export(options):
    """export.py: trace the checkpoint's deployed network to options.onnx_path, check it in onnxruntime, with
    --int8 quantise it beside, print the trtexec lines; exit status 1 when the parity check fails (the file is
    kept)."""
    output, facts, rows, seconds = export_float(options)
    size, batch = options.size, options.batch
    print(f"wrote {output} ({os.path.getsize(output) / 2**20:.1f} MB, {facts['arch']}"
          f"{' pruned' if facts['pruned'] else ''}, {facts['precision']}, opset {options.opset}, input image "
          f"{'Nx3xHxW' if options.dynamic else f'{batch}x3x{size}x{size}'}) in {seconds:.1f} s")
    _print_parity(rows)
    if not parity_passed(rows, options.half):
        print(f"export.py: parity check FAILED (tolerance: {PARITY_RULE[options.half]}); {output} was kept for "
              f"inspection", file=sys.stderr)
        sys.exit(1)
    print("parity check passed")
    if options.int8:
        export_int8(output, facts, options)
    print("build the TensorRT engine on the Jetson itself (engines are specific to the device):")
    print(f"  {trtexec_command(output, size, options.dynamic)}")
    if options.int8 and options.int8_recipe.target.symmetric:
        print(f"  {trtexec_command(int8_path(output), size, options.dynamic, int8=True)}")
    elif options.int8:
        print(f"  ({int8_path(output).name} is the {options.int8_recipe.int8_target} recipe, uint8 asymmetric, which "
              f"TensorRT refuses: export with --int8_target tensorrt for an INT8 engine)")


# --- benchmark ---------------------------------------------------------------------------------------------

def latency_row(label, backend, facts, seconds, batch):
    """One table row: the model's facts and its median / p90 latency per batch."""
    median = float(np.median(seconds))
    return {"model": label, "backend": backend, **facts, "median_ms": 1000 * median,
            "p90_ms": 1000 * float(np.percentile(seconds, 90)), "images_per_s": batch / median}


def unique_labels(paths):
    """Short names for the checkpoints ('demo_best' for runs/demo/best.pth), numbered where they repeat."""
    labels = [default_name(path) for path in paths]
    return [f"{label}#{labels[:index].count(label) + 1}" if labels.count(label) > 1 else label
            for index, label in enumerate(labels)]


@dataclass
class Variant:
    """One checkpoint ready to time: its facts, the deployed network on the device, its input batch and the
    classes it predicts (data.ClassTable)."""
    label: str
    facts: dict
    network: nn.Module
    image: torch.Tensor
    classes: data.ClassTable


@dataclass(frozen=True)
class VariantSpec:
    """How every variant is prepared and timed, checked when made: a batch x 3 x size x size input on `device`
    (--device's text, resolved to a torch.device then), float16 with `half` (CUDA only), channels-last memory,
    BatchNorm folded, the output stride (None: the checkpoint's) and whether a pickled model may be read."""
    size: int = 512
    batch: int = 1
    device: torch.device | str = "auto"
    half: bool = False
    channels_last: bool = False
    fold_batchnorm: bool = True
    output_stride: int | None = None
    allow_pickle: bool = False

    def __post_init__(self):
        for option, low in (("size", 32), ("batch", 1)):
            if getattr(self, option) < low:
                raise UserError(f"--{option} must be at least {low}, got {getattr(self, option)}")
        _resolved_device(self)
        if self.half and self.device.type != "cuda":
            raise UserError("--half runs float16 on a CUDA GPU only; on the CPU drop --half")

    @property
    def dtype(self):
        return torch.float16 if self.half else torch.float32


def prepare_variant(path, label, spec):
    """Load a checkpoint as deployed (main-head logits only), count its MACs, fold its BatchNorms
    (spec.fold_batchnorm), move it and its input to spec.device."""
    model, metadata = load_model(path, device="cpu", allow_pickle=spec.allow_pickle, stride=spec.output_stride)
    network = LogitsOnly(model, metadata["num_classes"]).eval()
    macs, params = count_macs(network, spec.size)
    if spec.fold_batchnorm:
        fold_batchnorm(network)
    facts = {"checkpoint": str(path), "arch": metadata["arch"], "pruned": bool(metadata.get("pruning")),
             "params_m": params / 1e6, "gmacs": macs / 1e9, "size": spec.size, "batch": spec.batch,
             "device": str(spec.device), "dtype": str(spec.dtype).replace("torch.", ""),
             "channels_last": spec.channels_last, "folded_bn": spec.fold_batchnorm}
    memory_format = torch.channels_last if spec.channels_last else torch.contiguous_format
    network = network.to(spec.device, spec.dtype).to(memory_format=memory_format)
    image = torch.randn(spec.batch, 3, spec.size, spec.size, device=spec.device, dtype=spec.dtype)
    return Variant(label, facts, network, image.contiguous(memory_format=memory_format),
                   checkpoint_classes(metadata, str(path)))


def prepare_onnx_variant(path, label, spec):
    """An ONNX file of export.py as a variant: onnxruntime runs it (on the CUDA provider for a CUDA device),
    its facts come from the graph (MACs scaled to spec.size), and a graph of another fixed size is refused now.
    The graph's own precision holds: spec's half, channels_last, fold_batchnorm and output_stride do not apply."""
    network = OnnxNetwork(path, spec.device)
    facts = {"checkpoint": str(path), "arch": network.facts["arch"], "pruned": network.facts["pruned"],
             "params_m": network.facts["params"] / 1e6, "gmacs": network.macs(spec.size) / 1e9, "size": spec.size,
             "batch": spec.batch, "device": str(spec.device), "dtype": network.facts["precision"],
             "channels_last": False, "folded_bn": True}
    image = torch.randn(spec.batch, 3, spec.size, spec.size)
    network.feed(image)
    return Variant(label, facts, network, image, checkpoint_classes(network.facts, str(path)))


def backend(variant):
    return "onnxruntime" if isinstance(variant.network, OnnxNetwork) else "pytorch"


def _onnx_calls(variants, folder, device):
    """One onnxruntime call per variant, each exported into `folder` first."""
    calls = []
    for index, variant in enumerate(variants):
        network = variant.network.to(memory_format=torch.contiguous_format)
        onnx_path = export_onnx(network, Path(folder) / f"model_{index}.onnx", variant.facts["size"],
                                variant.facts["batch"])
        session = onnx_session(onnx_path, device)
        feed = onnx_input(session, variant.image)
        calls.append(lambda session=session, feed=feed: session.run([OUTPUT_NAME], feed))
    return calls


def test_scores(variant, split, tolerance_px, device):
    """What test.py --eval_size SIZE scores for the variant on the labelled split (the one evaluation loop at its
    input size, whole images): mIoU and the crack tolerance F1 (NaN without a crack class)."""
    dataset = data.S2DSDataset(split, data.EvalTransform(variant.facts["size"]), require_labels=True)
    data.require_same_classes(variant.classes, dataset, variant.facts["checkpoint"])
    classes = variant.classes
    settings = EvalSettings(classes.num_classes, tolerance_px=tolerance_px, crack_id=classes.crack_id, progress=False)
    loader = eval_loader(dataset, variant.facts["batch"], 0, DistContext(device=torch.device(device)))
    result = evaluate(variant.network, loader, device, settings)
    tolerance = result.tolerance.compute() if result.tolerance is not None else {}
    return {"test_miou": result.confusion.compute()["mean_iou"], "crack_lt_f1": tolerance.get("lt_f1", float("nan"))}


def time_variants(variants, runs, warmup, device, onnx=False):
    """Rows of every variant (checkpoints in PyTorch and .onnx files in onnxruntime, in the same interleaved
    rounds), then with onnx=True each checkpoint exported and timed in onnxruntime."""
    batch = variants[0].facts["batch"]
    times = forward_times([v.network for v in variants], [v.image for v in variants], runs, warmup, device)
    rows = [latency_row(v.label, backend(v), v.facts, seconds, batch) for v, seconds in zip(variants, times)]
    exported = [v for v in variants if backend(v) == "pytorch"]
    if onnx and exported:
        with tempfile.TemporaryDirectory() as folder:
            times = interleaved_times(_onnx_calls(exported, folder, device), runs, warmup, torch.device("cpu"))
        rows += [latency_row(v.label, "onnxruntime", v.facts, seconds, batch) for v, seconds in zip(exported, times)]
    return rows


def print_onnx_speedups(rows):
    """One line per onnxruntime row against the first onnxruntime row (e.g. INT8 against float32), where a
    checkpoint came first (else run_benchmark's lines already say it)."""
    onnx_rows = [row for row in rows if row["backend"] == "onnxruntime"]
    if rows[0]["backend"] == "onnxruntime":
        return  # already compared with the first row, which is the first onnxruntime row
    for row in onnx_rows[1:]:
        print(f"{row['model']} ({row['dtype']}, onnxruntime): {row['speedup']:.2f}x the speed of "
              f"{onnx_rows[0]['model']} ({onnx_rows[0]['dtype']}, onnxruntime) with {1 / row['macs_ratio']:.2f}x "
              f"fewer MACs")


INT8_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name and which of the flags INT8 kernels use it has, from /proc/cpuinfo (Linux)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return "CPU model and flags: /proc/cpuinfo not readable"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    present = [flag for flag in INT8_CPU_FLAGS if flag in flags]
    absent = [flag for flag in INT8_CPU_FLAGS if flag not in flags]
    return (f"CPU: {fields.get('model name', 'unknown')}, {os.cpu_count()} logical cores; INT8-relevant flags: "
            f"{' '.join(present) or 'none'}{f' (not: {chr(32).join(absent)})' if absent else ''}")


def add_ratios(rows):
    """Parameters and MACs as fractions of the first row of the same backend, and the speed-up over it."""
    first = {}
    for row in rows:
        base = first.setdefault(row["backend"], row)
        row["params_ratio"] = row["params_m"] / base["params_m"]
        row["macs_ratio"] = row["gmacs"] / base["gmacs"]
        row["speedup"] = base["median_ms"] / row["median_ms"]
    return rows


def gemm_gflops(device, dtype=torch.float32, side=None, runs=5):
    """The machine's matrix-multiply rate (GFLOP/s of a large square GEMM, median of `runs`): the ceiling a
    convolutional network's 2 x MACs / latency is judged against, measured in the benchmark's own process."""
    side = side or (8192 if torch.device(device).type == "cuda" else 2048)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(side, side, generator=generator).to(device, dtype) for _ in range(2))
    seconds = time_calls(lambda: torch.mm(a, b), runs, 2, device)
    return 2 * side**3 / float(np.median(seconds)) / 1e9


def add_throughput(rows, gemm):
    """GFLOP/s of each row (2 x MACs per image x batch / median latency) and its fraction of the GEMM rate."""
    for row in rows:
        row["gflops"] = 2 * row["gmacs"] * row["batch"] / (row["median_ms"] / 1000)
        row["gemm_fraction"] = row["gflops"] / gemm
    return rows


def benchmark_rows(paths, spec, runs=20, warmup=WARMUP, onnx=False, scoring=None, progress=True):
    """Every checkpoint (or .onnx file) measured in one process as `spec` says, so the numbers are comparable;
    with onnx=True each checkpoint also exported and timed in onnxruntime; with scoring (test split, tolerance px)
    each file also scored on that split after the timing (test_scores). Returns rows with ratios, GFLOP/s and the
    fraction of the same process's GEMM rate (in row["gemm_gflops"])."""
    variants = [prepare_onnx_variant(path, label, spec) if is_onnx_path(path) else
                prepare_variant(path, label, spec)
                for path, label in tqdm(list(zip(paths, unique_labels(paths))), desc="loading",
                                        disable=not progress_enabled(progress), dynamic_ncols=True)]
    rows = add_ratios(time_variants(variants, runs, warmup, spec.device, onnx))
    gemm = gemm_gflops(spec.device, spec.dtype)
    for row in rows:
        row["gemm_gflops"] = gemm
    if scoring:
        for row, variant in zip(rows, variants):  # the files' rows come first, in their order
            row.update(test_scores(variant, *scoring, spec.device))
    return add_throughput(rows, gemm)


TABLE_COLUMNS = (("model", "model", "{}"), ("backend", "backend", "{}"), ("dtype", "precision", "{}"),
                 ("params_m", "params (M)", "{:.2f}"),
                 ("gmacs", "GMACs", "{:.2f}"), ("median_ms", "median ms", "{:.1f}"), ("p90_ms", "p90 ms", "{:.1f}"),
                 ("images_per_s", "images/s", "{:.2f}"), ("params_ratio", "params x", "{:.2f}"),
                 ("macs_ratio", "MACs x", "{:.2f}"), ("speedup", "speed-up", "{:.2f}"), ("gflops", "GFLOP/s", "{:.1f}"),
                 ("gemm_fraction", "of GEMM", "{:.0%}"), ("test_miou", "test mIoU", "{:.2%}"),
                 ("crack_lt_f1", "crack tol. F1", "{:.2%}"))


def format_table(rows):
    """The rows as an aligned text table, columns as in TABLE_COLUMNS (the scores where measured; a row without
    them, a checkpoint timed exported with --onnx, shows '-')."""
    columns = [column for column in TABLE_COLUMNS if any(column[0] in row for row in rows)]
    cells = [[title for _, title, _ in columns]]
    cells += [[fmt.format(row[key]) if key in row else "-" for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(line, widths))) for line in cells)


def plot_latency_vs_macs(rows, path, title=""):
    """Median latency (bar to p90) against GMACs; the dashed line is latency proportional to MACs
    from the first model, so a point under it ran faster than its MACs promise."""
    figure, axis = plt.subplots(figsize=(7, 4.8))
    for marker, backend in zip("os^", dict.fromkeys(row["backend"] for row in rows)):
        chosen = [row for row in rows if row["backend"] == backend]
        gmacs = np.array([row["gmacs"] for row in chosen])
        median = np.array([row["median_ms"] for row in chosen])
        p90 = np.array([row["p90_ms"] for row in chosen])
        points = axis.errorbar(gmacs, median, yerr=[np.zeros_like(median), p90 - median], fmt=marker,
                               capsize=3, label=backend)
        top = max(gmacs.max(), 1e-9) * 1.1
        axis.plot([0, top], [0, top * median[0] / max(gmacs[0], 1e-9)], "--", linewidth=1,
                  color=points[0].get_color(), alpha=0.6)
        for row in chosen:
            axis.annotate(row["model"], (row["gmacs"], row["median_ms"]), textcoords="offset points",
                          xytext=(5, 4), fontsize=8)
    axis.set(xlabel="GMACs per image", ylabel="latency per batch (ms, median; bar to p90)", title=title)
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(title="dashed: latency ∝ MACs", fontsize=8, title_fontsize=8)
    figure.tight_layout()
    replace_atomically(str(path), lambda temporary: figure.savefig(temporary, dpi=120, format="png"))
    plt.close(figure)


def write_benchmark(rows, folder, name, title=""):
    """CSV and plot under `folder`; returns (csv, png, how many existed before)."""
    csv_path, png_path = Path(folder) / f"{name}.csv", Path(folder) / f"{name}.png"
    existed = sum(path.exists() for path in (csv_path, png_path))
    write_csv(rows, str(csv_path))
    plot_latency_vs_macs(rows, png_path, title)
    return csv_path, png_path, existed


@dataclass(frozen=True)
class BenchmarkOptions:
    """What benchmark.py's run at one size needs, checked when made: the checkpoints and .onnx files to compare, how
    each is prepared and timed (`variant`), `runs` timed rounds after `warmup`, onnx: also time each checkpoint
    exported, with test_data each file also scored on that labelled split at the variant's size (test mIoU, crack
    tolerance F1 within lt_tolerance px), and where the table goes (OUTPUT_DIR/benchmark/NAME.csv and .png)."""
    checkpoints: tuple[str, ...]
    variant: VariantSpec
    runs: int = 20
    warmup: int = WARMUP
    onnx: bool = False
    test_data: str | None = None
    lt_tolerance: int = 4
    name: str = "benchmark"
    output_dir: str = "results"

    def __post_init__(self):
        for option, low in (("runs", 1), ("warmup", 0), ("lt_tolerance", 0)):
            if getattr(self, option) < low:
                raise UserError(f"--{option} must be at least {low}, got {getattr(self, option)}")
        plain_name(self.name, "--name")
        for path in self.checkpoints:
            if not os.path.isfile(path):
                raise UserError(f"checkpoint not found: {path}")
        if self.test_data is not None:
            require_path(self.test_data, "--test_data split", "dir")
            if self.variant.batch != 1 or self.variant.half:
                raise UserError("--test_data scores float32 networks one image per forward, as test.py does: drop "
                                "--batch and --half")

    @property
    def scoring(self):
        """(split, tolerance px) for benchmark_rows, None without --test_data."""
        return (self.test_data, self.lt_tolerance) if self.test_data else None


def benchmark_runs(values):
    """One BenchmarkOptions per --size (benchmark.py's parsed option values, `size` a list), the same files each."""
    return [options_from(BenchmarkOptions, values, size=size) for size in values["size"]]


def print_size_table(options, rows):
    """The table of one size's rows with its heading and the speed-up lines."""
    spec = options.variant
    print(f"\n{device_name(spec.device)}, batch {spec.batch} x {spec.size}x{spec.size} px, "
          f"{'float16' if spec.half else 'float32'}, {options.runs} runs after {options.warmup} warm-up, "
          f"BatchNorm {'folded' if spec.fold_batchnorm else 'kept'}, torch {torch.__version__}"
          + (f"; scored on {options.test_data} at {spec.size} px as test.py --eval_size {spec.size}"
             if options.test_data else ""))
    print(format_table(rows))
    print(f"GEMM rate of this device in this process: {rows[0]['gemm_gflops']:.1f} GFLOP/s "
          f"('of GEMM' = the network's 2 x MACs / latency as a fraction of it)")
    for row in rows[1:]:
        if row["backend"] == rows[0]["backend"]:
            print(f"{row['model']}: {row['speedup']:.2f}x the speed of {rows[0]['model']} with "
                  f"{1 / row['macs_ratio']:.2f}x fewer MACs ({row['speedup'] * row['macs_ratio']:.2f} of the MACs "
                  f"reduction) and {1 / row['params_ratio']:.2f}x fewer parameters")
    print_onnx_speedups(rows)


def run_benchmark(sizes):
    """benchmark.py: for each BenchmarkOptions in `sizes` (one per --size, the same files), every checkpoint
    measured in one process and printed as a table; all rows saved as one CSV and plot."""
    first = sizes[0]
    if first.variant.device.type == "cpu":
        print(cpu_description())
    rows = []
    for options in sizes:
        spec = options.variant
        size_rows = benchmark_rows(options.checkpoints, spec, options.runs, options.warmup, options.onnx,
                                   options.scoring)
        print_size_table(options, size_rows)
        rows += size_rows
    side = "/".join(str(options.variant.size) for options in sizes)
    title = f"{device_name(first.variant.device)}, batch {first.variant.batch} x {side} px"
    csv_path, png_path, existed = write_benchmark(rows, Path(first.output_dir) / "benchmark", first.name, title)
    print(f"wrote {csv_path} and {png_path}{' (replacing the previous ones)' if existed else ''}")
