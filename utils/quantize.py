"""INT8 by onnxruntime's static quantisation, and how far the INT8 graph's predictions agree with float32's.

QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised operator: what TensorRT builds as an
explicitly quantised engine and what onnxruntime's CPU provider fuses into integer kernels), int8 weights with
one scale per tensor (Int8Recipe: per output channel, 7-bit, on request), int8 activations symmetric around zero
(TensorRT takes only symmetric scales), their ranges MinMax-calibrated on real images read through the project's one normalisation (data.EvalTransform) at the export size.
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
from utils.onnx_model import INPUT_NAME, onnx_input

WEIGHT_SCALES = ("per_tensor", "per_channel")
# --int8_calibration's values and the onnxruntime CalibrationMethod each names
CALIBRATIONS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


@dataclass(frozen=True)
class Int8Recipe:
    """How --int8 quantises, checked when made: one scale per weight tensor or per output channel
    (int8_weights), 7-bit weights (int8_reduce_range: no int16 saturation in the int8 multiply-add of x86
    CPUs without VNNI), and how activation ranges are calibrated (int8_calibration: the largest value seen, or
    onnxruntime's percentile or entropy clipping). Activations are int8 and symmetric in every recipe (zero point
    0, as TensorRT's explicit quantisation wants). Which recipe agrees best with float32 depends on the network
    (README, step 3b): per-tensor MinMax, the default, was best on one demo network, per-channel on the next."""
    int8_weights: str = "per_tensor"
    int8_reduce_range: bool = False
    int8_calibration: str = "minmax"

    def __post_init__(self):
        if self.int8_weights not in WEIGHT_SCALES:
            raise UserError(f"--int8_weights must be one of {', '.join(WEIGHT_SCALES)}, got {self.int8_weights!r}")
        if self.int8_calibration not in CALIBRATIONS:
            raise UserError(f"--int8_calibration must be one of {', '.join(CALIBRATIONS)}, got "
                            f"{self.int8_calibration!r}")

    def describe(self):
        """One line for the user: what the INT8 graph is."""
        weights = "7-bit (reduced range) int8" if self.int8_reduce_range else "int8"
        return (f"QDQ, {weights} weights {self.int8_weights.replace('_', '-')}, int8 activations symmetric, "
                f"{CALIBRATIONS[self.int8_calibration]} calibration")


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
    `feeds`. Returns the seconds it took. The caller writes int8_path atomically (pass the temporary).

    The graph is first cleaned by onnxruntime's quantisation pre-processing (shape inference, Identity nodes
    of shared biases removed), without which the quantiser leaves those convolutions' biases in float.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    started = time.perf_counter()
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice on the root logger for every node it passes
    try:
        with tempfile.TemporaryDirectory() as folder:
            cleaned = os.path.join(folder, "preprocessed.onnx")
            quant_pre_process(str(fp32_path), cleaned, skip_symbolic_shape=True)
            quantize_static(cleaned, str(int8_path), _CalibrationReader(feeds), quant_format=QuantFormat.QDQ,
                            per_channel=recipe.int8_weights == "per_channel", reduce_range=recipe.int8_reduce_range,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=getattr(CalibrationMethod, CALIBRATIONS[recipe.int8_calibration]),
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    finally:
        root.setLevel(level)
    return time.perf_counter() - started


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
