"""INT8 by onnxruntime's static quantisation, and how far the INT8 graph's predictions agree with float32's.

QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised operator: what TensorRT builds as an
explicitly quantised engine and what onnxruntime's CPU provider fuses into integer kernels), int8 weights with
one scale per tensor or per output channel (7-bit on request), activation ranges calibrated on real images read
through the project's one normalisation (data.EvalTransform) at the export size. The activations' integer type is
the target's (INT8_TARGETS): uint8 with a zero point for onnxruntime on a CPU, int8 symmetric for TensorRT.
Optionally the convolutions whose quantisation costs the most agreement, measured one at a time, stay in float.
"""
import logging
import os
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from utils import data
from utils.cli import UserError
from utils.metrics import ConfusionMatrix
from utils.onnx_model import INPUT_NAME, INT8_KINDS, OUTPUT_NAME, onnx_input, onnx_session

WEIGHT_SCALES = ("per_tensor", "per_channel")
# --int8_calibration's values and the onnxruntime CalibrationMethod each names
CALIBRATIONS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass(frozen=True)
class Int8Target:
    """Where an INT8 graph runs and the activations its runtime is fastest with (weights are int8 and symmetric
    for both): the onnxruntime QuantType, whether the activations are symmetric (zero point 0), the usual name."""
    activation_type: str
    symmetric: bool
    kind: str
    runtime: str


# --int8_target's values. cpu: onnxruntime's x86 integer kernels multiply uint8 activations by int8 weights
# (VPMADDUBSW, VNNI's VPDPBUSD); int8 activations are first converted, so S8S8 ran slower than float32 there
# (docs/deployment_int8.md). tensorrt: explicit quantisation takes symmetric int8 scales only.
INT8_TARGETS = {"cpu": Int8Target("QUInt8", False, INT8_KINDS["cpu"], "onnxruntime on a CPU"),
                "tensorrt": Int8Target("QInt8", True, INT8_KINDS["tensorrt"], "TensorRT (trtexec --int8)")}
DEFAULT_INT8_TARGET = "cpu"  # the graphs this project runs itself (benchmark.py, test.py, the study) run there


@dataclass(frozen=True)
class Int8Recipe:
    """How --int8 quantises, checked when made: for which runtime (int8_target, INT8_TARGETS), one scale per
    weight tensor or per output channel (int8_weights), 7-bit weights (int8_reduce_range: no int16 saturation in
    the uint8 x int8 multiply-add of x86 CPUs without VNNI), how activation ranges are calibrated
    (int8_calibration: the largest value seen, or onnxruntime's percentile or entropy clipping), and how many
    convolutions stay in float (int8_float_layers: those whose quantisation alone costs the most agreement with
    float32 on the calibration images, measured one at a time). Which agrees best depends on the network:
    docs/deployment_int8.md has the measured levers."""
    int8_target: str = DEFAULT_INT8_TARGET
    int8_weights: str = "per_channel"
    int8_reduce_range: bool = False
    int8_calibration: str = "minmax"
    int8_float_layers: int = 0

    def __post_init__(self):
        for option, choices in (("int8_target", INT8_TARGETS), ("int8_weights", WEIGHT_SCALES),
                                ("int8_calibration", CALIBRATIONS)):
            if getattr(self, option) not in choices:
                raise UserError(f"--{option} must be one of {', '.join(choices)}, got {getattr(self, option)!r}")
        if self.int8_float_layers < 0:
            raise UserError(f"--int8_float_layers cannot be negative, got {self.int8_float_layers}")

    @property
    def target(self):
        return INT8_TARGETS[self.int8_target]

    def describe(self):
        """One line for the user: what the INT8 graph is."""
        weights = "7-bit (reduced range) int8" if self.int8_reduce_range else "int8"
        activations = "int8 symmetric" if self.target.symmetric else "uint8 asymmetric"
        kept = f", {self.int8_float_layers} most sensitive convolution(s) in float" if self.int8_float_layers else ""
        return (f"{self.target.kind} QDQ for {self.target.runtime}: {weights} weights "
                f"{self.int8_weights.replace('_', '-')}, {activations} activations, "
                f"{CALIBRATIONS[self.int8_calibration]} calibration{kept}")


def calibration_set(split_dir, size):
    """The split's images (labels not needed), each resized to shorter side `size` and centre-cropped to
    size x size, normalised as in training."""
    return data.S2DSDataset(split_dir, data.EvalTransform(size), require_labels=False)


def image_batches(dataset, indices, size, batch):
    """Normalised (batch, 3, size, size) tensors of the images at `indices`; a remainder short of a full batch
    is left out (a fixed-batch graph takes only full ones)."""
    for start in range(0, len(indices) - batch + 1, batch):
        images = [TF.center_crop(dataset[index][0], [size, size]) for index in indices[start:start + batch]]
        yield torch.stack(images)


def spread_indices(total, count):
    """`count` indices spread evenly over 0..total-1 (all of them when count >= total)."""
    if count >= total:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})


class _CalibrationReader:
    """onnxruntime's CalibrationDataReader protocol over prepared feeds."""

    def __init__(self, feeds):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)

    def rewind(self):  # read once by MinMax; kept for the protocol
        pass


def quantize_int8(fp32_path, int8_path, feeds, recipe=Int8Recipe()):
    """Write int8_path: fp32_path statically quantised by `recipe` (Int8Recipe) with the activation ranges of
    `feeds`, the recipe's most sensitive convolutions kept in float (sensitive_convolutions). Returns (seconds it
    took, the names of the convolutions kept in float). The caller writes int8_path atomically (pass the temporary).

    The graph is first cleaned by onnxruntime's quantisation pre-processing (shape inference, Identity nodes
    of shared biases removed), without which the quantiser leaves those convolutions' biases in float. The
    ranges are calibrated once and cached for every quantisation of the same graph.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger for every node it passes
    try:
        with tempfile.TemporaryDirectory() as folder:
            cleaned, ranges = os.path.join(folder, "preprocessed.onnx"), os.path.join(folder, "ranges.json")
            quant_pre_process(str(fp32_path), cleaned, skip_symbolic_shape=True)
            kept = []
            if recipe.int8_float_layers:
                ranked = sensitive_convolutions(cleaned, folder, feeds, recipe, ranges)
                kept = [name for name, _ in ranked[:recipe.int8_float_layers]]
            _quantize(cleaned, int8_path, feeds, recipe, ranges, kept)
    finally:
        root.setLevel(level)
    return time.perf_counter() - started, kept


def _quantize(cleaned, output, feeds, recipe, ranges, excluded=()):
    """One static QDQ quantisation of the cleaned graph by `recipe`, the nodes `excluded` left in float; the
    activation ranges are calibrated on `feeds` into the file `ranges`, or read from it when it exists."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    target = recipe.target
    quantize_static(cleaned, str(output), _CalibrationReader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=recipe.int8_weights == "per_channel", reduce_range=recipe.int8_reduce_range,
                    activation_type=getattr(QuantType, target.activation_type), weight_type=QuantType.QInt8,
                    nodes_to_exclude=list(excluded), calibration_cache_path=ranges,
                    calibrate_method=getattr(CalibrationMethod, CALIBRATIONS[recipe.int8_calibration]),
                    extra_options={"ActivationSymmetric": target.symmetric, "WeightSymmetric": True})


def convolution_names(path):
    """The names of the Conv nodes of an ONNX graph, in graph order."""
    import onnx

    return [node.name for node in onnx.load(str(path)).graph.node if node.op_type == "Conv"]


def sensitive_convolutions(cleaned, folder, feeds, recipe, ranges):
    """[(Conv name, agreement gained), ...], most sensitive first: for each convolution, the graph quantised by
    `recipe` with only that convolution left in float, its pixel agreement with the float32 graph on `feeds`
    minus that of the fully quantised graph. One quantisation per convolution (the ranges calibrated once)."""
    reference = onnx_session(cleaned)
    expected = [reference.run([OUTPUT_NAME], feed)[0].argmax(1) for feed in feeds]

    def agreement(excluded):
        candidate = os.path.join(folder, "candidate.onnx")
        _quantize(cleaned, candidate, feeds, recipe, ranges, excluded)
        session = onnx_session(candidate)
        return float(np.mean([(session.run([OUTPUT_NAME], feed)[0].argmax(1) == want).mean()
                              for feed, want in zip(feeds, expected)]))

    baseline = agreement([])
    gains = [(name, agreement([name]) - baseline) for name in convolution_names(cleaned)]
    return sorted(gains, key=lambda pair: -pair[1])


def check_calibration_split(split_dir, batch):
    """Refuse, before any export work, a split that cannot calibrate a graph of this batch: no Images/, no
    images in it, or fewer images than one batch. Returns how many images it holds."""
    count = len(data.find_samples(split_dir, require_labels=False))
    if count < batch:
        raise UserError(f"{split_dir} holds {count} image(s), fewer than the graph's batch of {batch}: pass a "
                        f"split with more images or export with --batch 1")
    return count


def calibration_feeds(dataset, count, size, batch, session):
    """The feeds of `count` images spread over the split (check_calibration_split has made sure of one batch)."""
    indices = spread_indices(len(dataset), count)
    return [onnx_input(session, images) for images in image_batches(dataset, indices, size, batch)]


def prediction_agreement(reference, candidate, dataset, size, batch, num_classes):
    """How far candidate's predictions agree with reference's (two onnxruntime sessions) on every image of the
    split: pixel agreement and the mIoU of candidate scored against reference's predictions as ground truth,
    from the one confusion matrix."""
    confusion = ConfusionMatrix(num_classes)
    for images in image_batches(dataset, list(range(len(dataset))), size, batch):
        feed = onnx_input(reference, images)
        expected = reference.run(None, feed)[0].argmax(1)
        actual = candidate.run(None, {INPUT_NAME: feed[INPUT_NAME]})[0].argmax(1)
        confusion.update(torch.from_numpy(expected.astype(np.int64)), torch.from_numpy(actual.astype(np.int64)))
    scores = confusion.compute()
    return {"pixel_agreement": scores["pixel_accuracy"], "miou": scores["mean_iou"],
            "images": scores["num_images"], "pixels": scores["labelled_pixels"]}
