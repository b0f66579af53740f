"""Deployment: ONNX export checked against PyTorch with onnxruntime, and its INT8 graphs (export.py's run).

export.py is the front door to this module, benchmark.py's is utils.benchmarking. The exported graph is the inference
network only: one tensor of main-head logits (no dict, no auxiliary head, no thesis 8th channel),
so TensorRT's trtexec builds an engine from it directly.
"""
import copy
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.checkpoint import checkpoint_classes, load_model
from utils.cli import UserError, default_name, require_path, resolve_device
from utils.files import refuse_existing, replace_atomically
from utils.model import count_macs, fold_batchnorm, forward_logits, strip_aux_head
from utils.onnx_model import INPUT_NAME, OUTPUT_NAME, facts_metadata, onnx_input, onnx_session
from utils.quantize import (Int8Recipe, calibration_feeds, calibration_set, check_calibration_split,
                            prediction_agreement, quantize_int8)

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


def resolved_device(spec):
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
        resolved_device(self)

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
