"""Segmentation metrics: one confusion matrix as the source of every pixel metric (docs/ARCHITECTURE.md, "Metrics").

Model-free: imports no model code. Counts are accumulated as integers and all-reduced under DDP, so a
split scored on several processes gives the same numbers as on one; ratios are taken only at the end,
on the CPU in float64.

NaN conventions (per class, TP/FP/FN from the matrix):
    precision = TP / (TP + FP)       NaN when the class is never predicted
    recall    = TP / (TP + FN)       NaN when the class is absent from the ground truth
    iou       = TP / (TP + FP + FN)  NaN only when the class is absent from both
    f1 (Dice) = 2TP / (2TP + FP + FN) NaN only when the class is absent from both
So a class absent from both is NaN everywhere and left out of every mean (nanmean); a class predicted
but absent from the ground truth scores IoU 0, F1 0, precision 0 (and recall NaN), and lowers the means.
Mean precision and mean recall are taken over the same classes as mIoU (present in the ground truth or
the prediction), a per-class NaN counting as 0 there: a network that predicts only background must not
get its background precision as "mean precision" because the classes it never predicts drop out.
"""
import numpy as np
import torch
import torch.distributed as dist
from scipy.spatial import cKDTree
from skimage.morphology import skeletonize

from utils.data import BACKGROUND_ID, IGNORE_INDEX

TOLERANCE_COUNT_KEYS = ("tp_pred", "n_pred", "tp_gt", "n_gt")


def _as_label_tensor(values, name):
    """An integer tensor; float or bool labels are refused because they mean a caller bug (logits, masks)."""
    tensor = torch.as_tensor(values)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"{name} must hold integer class ids, got dtype {tensor.dtype}")
    return tensor


def _all_reduce_sum(tensor):
    """Sum a tensor over all processes when torch.distributed is initialized, otherwise return it as is.

    NCCL reduces only CUDA tensors, so a CPU tensor travels to the current GPU and back.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        on_gpu = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_gpu)
        return on_gpu.to(tensor.device)
    dist.all_reduce(tensor)
    return tensor


def _nanmean(values):
    """Mean over the non-NaN entries; NaN (without numpy's warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def _mean_over_present(values, iou):
    """Mean over the classes present in the ground truth or the prediction (finite IoU), NaN counted as 0."""
    present = ~np.isnan(np.asarray(iou, dtype=np.float64))
    return _nanmean(np.nan_to_num(np.asarray(values, dtype=np.float64)[present], nan=0.0))


def _ratio(numerator, denominator):
    """Elementwise numerator / denominator in float64, with 0/0 = NaN."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(numerator, dtype=np.float64) / np.asarray(denominator, dtype=np.float64)


def _matrix_to_numpy(matrix):
    """A square float64 numpy copy of a confusion matrix given as a numpy array or a torch tensor."""
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"a confusion matrix must be square 2-D, got shape {matrix.shape}")
    return matrix


def confusion_matrix(target, prediction, num_classes, ignore_index=IGNORE_INDEX):
    """The int64 (num_classes, num_classes) matrix of one target/prediction pair, on the target's device.

    Rows are ground truth, columns prediction; pixels whose target is ignore_index are left out.
    A target or prediction value outside [0, num_classes) is a ValueError rather than silently
    landing in another cell.
    """
    target = _as_label_tensor(target, "target")
    prediction = _as_label_tensor(prediction, "prediction").to(target.device)
    if target.shape != prediction.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from prediction shape "
                         f"{tuple(prediction.shape)}; bring predictions to the label's resolution")
    labelled = target != ignore_index
    target = target[labelled].long()
    prediction = prediction[labelled].long()
    out_of_range = (target < 0) | (target >= num_classes) | (prediction < 0) | (prediction >= num_classes)
    if out_of_range.any():  # one device sync per update
        for name, values in (("target", target), ("prediction", prediction)):
            bad = values[(values < 0) | (values >= num_classes)]
            if bad.numel():
                raise ValueError(f"{name} holds class id {int(bad[0])} outside [0, {num_classes}) "
                                 f"(ignore label {ignore_index} aside)")
    counts = torch.bincount(target * num_classes + prediction, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def per_class_metrics(matrix):
    """Per-class float64 arrays iou, precision, recall, f1 (= Dice) and int64 support_pixels (row sums).

    NaN conventions are those in the module docstring; an all-zero matrix gives all-NaN scores here,
    and summary_metrics is where an empty split is refused.
    """
    matrix = _matrix_to_numpy(matrix)
    tp = np.diag(matrix)
    gt_pixels = matrix.sum(axis=1)
    predicted_pixels = matrix.sum(axis=0)
    fp = predicted_pixels - tp
    fn = gt_pixels - tp
    return {
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, predicted_pixels),
        "recall": _ratio(tp, gt_pixels),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "support_pixels": gt_pixels.astype(np.int64),
    }


def summary_metrics(matrix, background_id=BACKGROUND_ID):
    """Split-level scalars from a confusion matrix, as Python floats (int for labelled_pixels).

    Keys: pixel_accuracy, mean_iou, mean_iou_no_background, mean_f1, mean_precision, mean_recall,
    fw_iou (sum over classes of ground-truth pixel frequency * IoU) and labelled_pixels. Every mean is
    over the classes present in the ground truth or the prediction (module docstring). A matrix with no labelled pixels is a ValueError: an empty split has no score, and
    reporting 0 or NaN would pass for a result.
    """
    matrix = _matrix_to_numpy(matrix)
    total = matrix.sum()
    if total == 0:
        raise ValueError("no labelled pixels to score: the split is empty or every pixel is ignored")
    per_class = per_class_metrics(matrix)
    iou = per_class["iou"]
    frequency = matrix.sum(axis=1) / total
    # A NaN IoU means the class is absent from the ground truth, so its frequency weight is 0 anyway.
    fw_iou = float(np.nansum(frequency * iou))
    return {
        "pixel_accuracy": float(np.trace(matrix) / total),
        "mean_iou": _nanmean(iou),
        "mean_iou_no_background": _nanmean(np.delete(iou, background_id)),
        "mean_f1": _nanmean(per_class["f1"]),
        "mean_precision": _mean_over_present(per_class["precision"], iou),
        "mean_recall": _mean_over_present(per_class["recall"], iou),
        "fw_iou": fw_iou,
        "labelled_pixels": int(total),
    }


class ConfusionMatrix:
    """Accumulates the split's confusion matrix and per-class image support, on the data's device.

    `matrix` is int64 (rows ground truth, columns prediction); `image_support[c]` counts the images
    whose ground truth contains class c, and `num_images` all images seen. Each update treats a
    target of shape (N, ...) with 3 or more dims as N images and a 1-D or 2-D target as one image.
    """

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX, device=None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id in [0, {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.reset()

    def reset(self):
        """Zero all counts, to reuse the object for another split or epoch."""
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)
        self.image_support = torch.zeros(self.num_classes, dtype=torch.int64, device=self.device)
        self.num_images = torch.zeros((), dtype=torch.int64, device=self.device)

    def _follow(self, device):
        """Move the counts to where the data lives, so bincount results add without copies."""
        if device != self.matrix.device:
            self.device = device
            self.matrix = self.matrix.to(device)
            self.image_support = self.image_support.to(device)
            self.num_images = self.num_images.to(device)

    def update(self, target, prediction):
        """Add a batch (N, H, W) or one image (H, W) of integer class ids; shapes must match."""
        target = _as_label_tensor(target, "target")
        self._follow(target.device)
        self.matrix += confusion_matrix(target, prediction, self.num_classes, self.ignore_index)
        images = target.reshape(target.shape[0], -1) if target.ndim >= 3 else target.reshape(1, -1)
        image_index = torch.arange(images.shape[0], device=images.device).unsqueeze(1).expand_as(images)
        labelled = images != self.ignore_index
        presence = torch.bincount(image_index[labelled] * self.num_classes + images[labelled].long(),
                                  minlength=images.shape[0] * self.num_classes)
        self.image_support += (presence.reshape(images.shape[0], self.num_classes) > 0).sum(dim=0)
        self.num_images += images.shape[0]

    def all_reduce(self):
        """Sum the counts over all processes (no-op without torch.distributed), in one collective."""
        packed = torch.cat([self.matrix.flatten(), self.image_support, self.num_images.reshape(1)])
        packed = _all_reduce_sum(packed)
        n = self.num_classes
        self.matrix = packed[: n * n].reshape(n, n)
        self.image_support = packed[n * n: n * n + n]
        self.num_images = packed[-1]

    def compute(self, background_id=BACKGROUND_ID):
        """Per-class arrays and summary scalars in one dict; ValueError when nothing was labelled.

        Keys: iou, precision, recall, f1, support_pixels, support_images (numpy arrays per class);
        pixel_accuracy, mean_iou, mean_iou_no_background, mean_f1, mean_precision, mean_recall,
        fw_iou, labelled_pixels, num_images (scalars).
        """
        matrix = self.matrix.cpu().numpy()
        result = summary_metrics(matrix, background_id)
        result.update(per_class_metrics(matrix))
        result["support_images"] = self.image_support.cpu().numpy()
        result["num_images"] = int(self.num_images)
        return result


def image_scores(target, prediction, num_classes, crack_id=None, ignore_index=IGNORE_INDEX):
    """Scores of ONE image, reported beside the split metrics: dict(miou, and crack_iou where a class is crack).

    miou is the nanmean IoU over the classes present in this image's ground truth or prediction;
    crack_iou is NaN when crack is absent from both. An image with no labelled pixel gives NaN for both.
    """
    iou = per_class_metrics(confusion_matrix(target, prediction, num_classes, ignore_index))["iou"]
    scores = {"miou": _nanmean(iou)}
    if crack_id is not None:
        scores["crack_iou"] = float(iou[crack_id])
    return scores


def _as_bool_mask(mask, name):
    """A 2-D numpy bool array from a numpy array or tensor."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {mask.shape}")
    return mask


def _matched(skeleton, other_skeleton, tolerance_px):
    """Number of skeleton pixels lying within tolerance_px (Euclidean) of some other_skeleton pixel.

    A k-d tree over the few skeleton pixels is far cheaper than a distance map of the whole image.
    """
    if not skeleton.any() or not other_skeleton.any():
        return 0
    tree = cKDTree(np.argwhere(other_skeleton))
    distance, _ = tree.query(np.argwhere(skeleton), k=1, distance_upper_bound=tolerance_px + 1e-9)
    return int(np.count_nonzero(np.isfinite(distance)))


def crack_tolerance_scores(target_crack, pred_crack, tolerance_px=4):
    """Summable tolerance counts of one image's crack masks: dict(tp_pred, n_pred, tp_gt, n_gt).

    Both masks are thinned to 1-px skeletons first, so a crack drawn 2 px wide and predicted 5 px wide
    is judged by its course, not its width (Benz & Rodehorst). n_pred / n_gt are the skeleton pixel
    counts; tp_pred counts prediction skeleton pixels within tolerance_px of the ground-truth skeleton,
    tp_gt ground-truth skeleton pixels within tolerance_px of the prediction skeleton.
    """
    if tolerance_px < 0:
        raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
    target_crack = _as_bool_mask(target_crack, "target_crack")
    pred_crack = _as_bool_mask(pred_crack, "pred_crack")
    if target_crack.shape != pred_crack.shape:
        raise ValueError(f"target_crack shape {target_crack.shape} differs from pred_crack shape {pred_crack.shape}")
    gt_skeleton = skeletonize(target_crack) if target_crack.any() else target_crack
    pred_skeleton = skeletonize(pred_crack) if pred_crack.any() else pred_crack
    return {
        "tp_pred": _matched(pred_skeleton, gt_skeleton, tolerance_px),
        "n_pred": int(np.count_nonzero(pred_skeleton)),
        "tp_gt": _matched(gt_skeleton, pred_skeleton, tolerance_px),
        "n_gt": int(np.count_nonzero(gt_skeleton)),
    }


def tolerance_metrics(counts):
    """lt_precision, lt_recall, lt_f1 and lt_iou (floats) from summed crack_tolerance_scores counts.

    lt_precision = tp_pred / n_pred (NaN without predicted skeleton), lt_recall = tp_gt / n_gt (NaN
    without ground-truth skeleton), lt_f1 their harmonic mean (0 when only one side is empty).
    lt_iou = tp_gt / (n_gt + n_pred - tp_pred), i.e. TP = matched GT pixels, FN = unmatched GT, FP =
    unmatched prediction: the centerline IoU of Benz & Rodehorst's own code (enstrect clCloudIoU),
    which stays a plain count ratio because matches are counted on each side separately.
    All four are NaN when both skeletons are empty: there is no crack to score.
    """
    tp_pred, n_pred, tp_gt, n_gt = (int(counts[key]) for key in TOLERANCE_COUNT_KEYS)
    if n_pred == 0 and n_gt == 0:
        nan = float("nan")
        return {"lt_precision": nan, "lt_recall": nan, "lt_f1": nan, "lt_iou": nan}
    precision = tp_pred / n_pred if n_pred else float("nan")
    recall = tp_gt / n_gt if n_gt else float("nan")
    if n_pred == 0 or n_gt == 0 or precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {"lt_precision": precision, "lt_recall": recall, "lt_f1": f1,
            "lt_iou": tp_gt / (n_gt + n_pred - tp_pred)}


class ToleranceAccumulator:
    """Sums crack tolerance counts over a split, image by image, and all-reduces them like the matrix."""

    def __init__(self, tolerance_px=4):
        if tolerance_px < 0:
            raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
        self.tolerance_px = tolerance_px
        self.reset()

    def reset(self):
        """Zero the counts."""
        self.counts = dict.fromkeys(TOLERANCE_COUNT_KEYS, 0)

    def update(self, target_ids, pred_ids, crack_id, ignore_index=IGNORE_INDEX):
        """Add one image (H, W), or each image of a batch (N, H, W), of class ids.

        Predicted crack on ignored pixels is dropped before thinning, as ignored pixels have no truth.
        """
        target_ids = _as_label_tensor(target_ids, "target_ids").detach().cpu().numpy()
        pred_ids = _as_label_tensor(pred_ids, "pred_ids").detach().cpu().numpy()
        if target_ids.shape != pred_ids.shape:
            raise ValueError(f"target shape {target_ids.shape} differs from prediction shape {pred_ids.shape}")
        if target_ids.ndim not in (2, 3):
            raise ValueError(f"expected an image (H, W) or a batch (N, H, W), got shape {target_ids.shape}")
        if target_ids.ndim == 2:
            target_ids, pred_ids = target_ids[None], pred_ids[None]
        for target, prediction in zip(target_ids, pred_ids):
            scores = crack_tolerance_scores(target == crack_id,
                                            (prediction == crack_id) & (target != ignore_index),
                                            self.tolerance_px)
            for key in TOLERANCE_COUNT_KEYS:
                self.counts[key] += scores[key]

    def all_reduce(self):
        """Sum the counts over all processes (no-op without torch.distributed)."""
        packed = torch.tensor([self.counts[key] for key in TOLERANCE_COUNT_KEYS], dtype=torch.int64)
        packed = _all_reduce_sum(packed)
        self.counts = dict(zip(TOLERANCE_COUNT_KEYS, (int(value) for value in packed)))

    def compute(self):
        """tolerance_metrics of the summed counts: lt_precision, lt_recall, lt_f1, lt_iou."""
        return tolerance_metrics(self.counts)
