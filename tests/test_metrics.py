"""utils.metrics against confusion matrices and line drawings worked out by hand."""
import math
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils.metrics import (ConfusionMatrix, ToleranceAccumulator, confusion_matrix, crack_tolerance_scores,
                           image_scores, per_class_metrics, summary_metrics, tolerance_metrics)

NAN = float("nan")

# 3 classes, one 2x4 image; the 255 pixel is ignored.
TARGET = torch.tensor([[0, 0, 1, 1],
                       [2, 2, 255, 0]])
PREDICTION = torch.tensor([[0, 1, 1, 1],
                           [2, 0, 2, 0]])
# Labelled (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (0,0)
EXPECTED_MATRIX = [[2, 1, 0],
                   [0, 2, 0],
                   [1, 0, 1]]


def assert_array(actual, expected):
    np.testing.assert_allclose(np.asarray(actual, dtype=float), np.asarray(expected, dtype=float),
                               rtol=0, atol=1e-12, equal_nan=True)


def test_matrix_by_hand_excludes_ignore():
    cm = ConfusionMatrix(3)
    cm.update(TARGET, PREDICTION)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == EXPECTED_MATRIX
    assert int(cm.matrix.sum()) == 7  # 8 pixels, one ignored


def test_per_class_metrics_by_hand():
    m = per_class_metrics(np.array(EXPECTED_MATRIX))
    # class 0: TP 2, FP 1 (gt 2 -> pred 0), FN 1 (gt 0 -> pred 1); class 1: TP 2, FP 1, FN 0;
    # class 2: TP 1, FP 0, FN 1
    assert_array(m["iou"], [2 / 4, 2 / 3, 1 / 2])
    assert_array(m["precision"], [2 / 3, 2 / 3, 1 / 1])
    assert_array(m["recall"], [2 / 3, 2 / 2, 1 / 2])
    assert_array(m["f1"], [4 / 6, 4 / 5, 2 / 3])
    assert m["support_pixels"].tolist() == [3, 2, 2]


def test_summary_metrics_by_hand():
    s = summary_metrics(torch.tensor(EXPECTED_MATRIX))  # a torch matrix is accepted too
    assert s["pixel_accuracy"] == pytest.approx(5 / 7)
    assert s["mean_iou"] == pytest.approx(5 / 9)  # (1/2 + 2/3 + 1/2) / 3
    assert s["mean_iou_no_background"] == pytest.approx(7 / 12)  # (2/3 + 1/2) / 2
    assert s["mean_f1"] == pytest.approx(32 / 45)  # (2/3 + 4/5 + 2/3) / 3
    assert s["mean_precision"] == pytest.approx(7 / 9)  # (2/3 + 2/3 + 1) / 3
    assert s["mean_recall"] == pytest.approx(13 / 18)  # (2/3 + 1 + 1/2) / 3
    assert s["fw_iou"] == pytest.approx(23 / 42)  # (3 * 1/2 + 2 * 2/3 + 2 * 1/2) / 7
    assert s["labelled_pixels"] == 7


def test_compute_combines_everything():
    cm = ConfusionMatrix(3)
    cm.update(TARGET, PREDICTION)
    result = cm.compute()
    assert set(result) == {"iou", "precision", "recall", "f1", "support_pixels", "support_images",
                           "pixel_accuracy", "mean_iou", "mean_iou_no_background", "mean_f1",
                           "mean_precision", "mean_recall", "fw_iou", "labelled_pixels", "num_images"}
    assert result["mean_iou"] == pytest.approx(5 / 9)
    assert result["support_images"].tolist() == [1, 1, 1]
    assert result["num_images"] == 1


def test_class_absent_from_both_is_nan_and_left_out_of_means():
    # 4 classes; 2 and 3 appear nowhere. Matrix rows: [2,0,0,0], [1,1,0,0].
    target = torch.tensor([[0, 0, 1, 1]])
    prediction = torch.tensor([[0, 0, 1, 0]])
    matrix = confusion_matrix(target, prediction, 4)
    assert matrix.tolist() == [[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    m = per_class_metrics(matrix)
    assert_array(m["iou"], [2 / 3, 1 / 2, NAN, NAN])
    assert_array(m["precision"], [2 / 3, 1, NAN, NAN])
    assert_array(m["recall"], [1, 1 / 2, NAN, NAN])
    assert_array(m["f1"], [4 / 5, 2 / 3, NAN, NAN])
    s = summary_metrics(matrix)
    assert s["mean_iou"] == pytest.approx(7 / 12)  # (2/3 + 1/2) / 2, not divided by 4
    assert s["mean_f1"] == pytest.approx(11 / 15)  # (4/5 + 2/3) / 2
    assert s["fw_iou"] == pytest.approx(7 / 12)  # (2 * 2/3 + 2 * 1/2) / 4


def test_predicted_but_absent_class_scores_zero_and_lowers_mean():
    # class 2 is predicted once but never in the ground truth. Rows: [1,0,1], [0,2,0], [0,0,0].
    target = torch.tensor([[0, 0, 1, 1]])
    prediction = torch.tensor([[0, 2, 1, 1]])
    m = per_class_metrics(confusion_matrix(target, prediction, 3))
    assert_array(m["iou"], [1 / 2, 1, 0])
    assert_array(m["precision"], [1, 1, 0])
    assert_array(m["recall"], [1 / 2, 1, NAN])
    assert_array(m["f1"], [2 / 3, 1, 0])
    assert summary_metrics(confusion_matrix(target, prediction, 3))["mean_iou"] == pytest.approx(1 / 2)


def test_class_in_ground_truth_never_predicted():
    m = per_class_metrics(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 0]), 2))
    assert_array(m["iou"], [1 / 2, 0])
    assert_array(m["precision"], [1 / 2, NAN])
    assert_array(m["recall"], [1, 0])
    assert_array(m["f1"], [2 / 3, 0])


def test_a_network_predicting_only_background_gets_no_flattering_mean_precision():
    # 4 classes; ground truth: 8 background, 1 crack-like class 1; prediction: all background.
    # Rows: [8,0,0,0], [1,0,0,0], [0,0,0,0], [0,0,0,0]. Per class, precision [8/9, NaN, NaN, NaN]:
    # the old nanmean gave 8/9 = 89%. Classes present (gt or prediction): 0 and 1, so the means are
    # over two classes with class 1's undefined precision counted as 0.
    target = torch.tensor([[0] * 8 + [1]])
    prediction = torch.zeros_like(target)
    s = summary_metrics(confusion_matrix(target, prediction, 4))
    assert s["mean_precision"] == pytest.approx(4 / 9)  # (8/9 + 0) / 2
    assert s["mean_recall"] == pytest.approx(1 / 2)  # (1 + 0) / 2
    assert s["mean_f1"] == pytest.approx(8 / 17)  # (16/17 + 0) / 2
    assert s["mean_iou"] == pytest.approx(4 / 9)  # (8/9 + 0) / 2, unchanged


def test_mean_recall_counts_a_predicted_but_absent_class_as_zero():
    # Rows: [1,0,1], [0,2,0], [0,0,0]: class 2 is predicted once, absent from the ground truth, so its
    # recall is NaN per class but 0 in the mean over the three classes present (sklearn's zero_division=0).
    target = torch.tensor([[0, 0, 1, 1]])
    s = summary_metrics(confusion_matrix(target, torch.tensor([[0, 2, 1, 1]]), 3))
    assert s["mean_precision"] == pytest.approx(2 / 3)  # (1 + 1 + 0) / 3
    assert s["mean_recall"] == pytest.approx(1 / 2)  # (1/2 + 1 + 0) / 3


def test_empty_matrix_refused():
    with pytest.raises(ValueError, match="no labelled pixels"):
        summary_metrics(np.zeros((3, 3), dtype=np.int64))
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="no labelled pixels"):
        cm.compute()
    cm.update(torch.full((2, 4), 255), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="no labelled pixels"):
        cm.compute()


def test_bad_inputs_refused():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target holds class id 3"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="prediction holds class id 5"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 4, dtype=torch.long), torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.zeros(4))
    assert int(cm.matrix.sum()) == 0  # refused updates leave no trace
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(3, ignore_index=2)


def _random_batch(seed, n=4, size=8, num_classes=7):
    generator = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_classes, (n, size, size), generator=generator)
    target[torch.rand(n, size, size, generator=generator) < 0.1] = 255
    prediction = torch.randint(0, num_classes, (n, size, size), generator=generator)
    return target, prediction


def test_accumulation_equals_one_update_on_concatenation():
    batches = [_random_batch(seed) for seed in range(3)]
    pieces = ConfusionMatrix(7)
    for target, prediction in batches:
        pieces.update(target, prediction)
    whole = ConfusionMatrix(7)
    whole.update(torch.cat([t for t, _ in batches]), torch.cat([p for _, p in batches]))
    assert torch.equal(pieces.matrix, whole.matrix)
    assert torch.equal(pieces.image_support, whole.image_support)
    assert int(pieces.num_images) == int(whole.num_images) == 12
    pieces.reset()
    assert int(pieces.matrix.sum()) == 0 and int(pieces.image_support.sum()) == 0 and int(pieces.num_images) == 0


def test_per_image_support_counts():
    target = torch.tensor([[[0, 0], [0, 1]],          # classes 0, 1
                           [[0, 0], [0, 0]],          # class 0
                           [[2, 255], [255, 255]],    # class 2 (ignore is no class)
                           [[255, 255], [255, 255]]])  # nothing labelled
    cm = ConfusionMatrix(3)
    cm.update(target, torch.zeros_like(target))
    assert cm.image_support.tolist() == [2, 1, 1]
    assert int(cm.num_images) == 4
    cm.update(target[0], target[0])  # a 2-D target is one image
    assert cm.image_support.tolist() == [3, 2, 1]
    assert int(cm.num_images) == 5


def test_all_reduce_without_distributed_is_a_no_op():
    cm = ConfusionMatrix(3)
    cm.update(TARGET, PREDICTION)
    cm.all_reduce()
    assert cm.matrix.tolist() == EXPECTED_MATRIX
    assert int(cm.num_images) == 1


def _ddp_worker(rank, world_size, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=60))
    try:
        target, prediction = _random_batch(0)
        half = slice(0, 2) if rank == 0 else slice(2, 4)
        cm = ConfusionMatrix(7)
        cm.update(target[half], prediction[half])
        cm.all_reduce()
        tolerance = ToleranceAccumulator(tolerance_px=1)
        tolerance.update(target[half], prediction[half], 6)
        tolerance.all_reduce()
        np.savez(f"{out_dir}/rank{rank}.npz", matrix=cm.matrix.numpy(), support=cm.image_support.numpy(),
                 num_images=cm.num_images.numpy(), tolerance=[tolerance.counts[k] for k in sorted(tolerance.counts)])
    finally:
        dist.destroy_process_group()


def test_two_process_all_reduce_equals_single_process(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    target, prediction = _random_batch(0)
    single = ConfusionMatrix(7)
    single.update(target, prediction)
    tolerance = ToleranceAccumulator(tolerance_px=1)
    tolerance.update(target, prediction, 6)
    for rank in range(2):
        result = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(result["matrix"], single.matrix.numpy())
        np.testing.assert_array_equal(result["support"], single.image_support.numpy())
        assert int(result["num_images"]) == 4
        assert result["tolerance"].tolist() == [tolerance.counts[k] for k in sorted(tolerance.counts)]


def test_image_scores():
    # The hand-worked image above: IoUs 1/2, 2/3, 1/2; call class 2 the crack.
    scores = image_scores(TARGET, PREDICTION, num_classes=3, crack_id=2)
    assert scores["miou"] == pytest.approx(5 / 9)
    assert scores["crack_iou"] == pytest.approx(1 / 2)
    # crack (class 3) absent from both: NaN, and left out of the image mIoU (IoUs 2/3, 1/2)
    scores = image_scores(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 0]]), num_classes=4, crack_id=3)
    assert math.isnan(scores["crack_iou"])
    assert scores["miou"] == pytest.approx(7 / 12)


def _line(rows, cols=slice(5, 35), shape=(40, 40)):
    mask = np.zeros(shape, dtype=bool)
    for row in rows:
        mask[row, cols] = True
    return mask


def test_line_shifted_by_two_px_is_perfect_within_tolerance_four():
    counts = crack_tolerance_scores(_line([10]), _line([12]), tolerance_px=4)
    assert counts == {"tp_pred": 30, "n_pred": 30, "tp_gt": 30, "n_gt": 30}
    assert tolerance_metrics(counts) == {"lt_precision": 1.0, "lt_recall": 1.0, "lt_f1": 1.0, "lt_iou": 1.0}


def test_line_shifted_by_two_px_is_zero_within_tolerance_one():
    counts = crack_tolerance_scores(_line([10]), _line([12]), tolerance_px=1)
    assert counts == {"tp_pred": 0, "n_pred": 30, "tp_gt": 0, "n_gt": 30}
    assert tolerance_metrics(counts) == {"lt_precision": 0.0, "lt_recall": 0.0, "lt_f1": 0.0, "lt_iou": 0.0}


def test_extra_far_line_halves_precision():
    counts = crack_tolerance_scores(_line([10]), _line([10, 30]), tolerance_px=4)
    assert counts == {"tp_pred": 30, "n_pred": 60, "tp_gt": 30, "n_gt": 30}
    metrics = tolerance_metrics(counts)
    assert metrics["lt_precision"] == pytest.approx(1 / 2)
    assert metrics["lt_recall"] == pytest.approx(1)
    assert metrics["lt_f1"] == pytest.approx(2 / 3)
    assert metrics["lt_iou"] == pytest.approx(1 / 2)  # 30 matched GT / (30 GT + 30 unmatched predicted)


def test_wide_prediction_is_judged_by_its_skeleton():
    # a 5-px-wide band over the 1-px GT line thins to (about) the GT line itself
    counts = crack_tolerance_scores(_line([10]), _line(range(8, 13)), tolerance_px=4)
    assert counts["n_pred"] < 35  # 5 * 30 = 150 band pixels thinned to one line
    assert tolerance_metrics(counts)["lt_precision"] == 1.0
    assert tolerance_metrics(counts)["lt_recall"] == 1.0


def test_tolerance_empty_cases():
    empty = np.zeros((40, 40), dtype=bool)
    counts = crack_tolerance_scores(empty, empty)
    assert counts == {"tp_pred": 0, "n_pred": 0, "tp_gt": 0, "n_gt": 0}
    assert all(math.isnan(value) for value in tolerance_metrics(counts).values())
    missed = tolerance_metrics(crack_tolerance_scores(_line([10]), empty))
    assert math.isnan(missed["lt_precision"])
    assert (missed["lt_recall"], missed["lt_f1"], missed["lt_iou"]) == (0.0, 0.0, 0.0)
    invented = tolerance_metrics(crack_tolerance_scores(empty, _line([10])))
    assert math.isnan(invented["lt_recall"])
    assert (invented["lt_precision"], invented["lt_f1"], invented["lt_iou"]) == (0.0, 0.0, 0.0)


def test_tolerance_accumulator_sums_images_and_drops_ignored_prediction():
    crack, ignore = 6, 255
    target = np.zeros((2, 40, 40), dtype=np.int64)
    prediction = np.zeros((2, 40, 40), dtype=np.int64)
    target[0][_line([10])] = crack
    prediction[0][_line([12])] = crack
    target[1][_line([20])] = crack
    prediction[1][_line([20])] = crack
    target[1, 28:33] = ignore
    prediction[1][_line([30])] = crack  # predicted crack on ignored pixels: not counted
    accumulator = ToleranceAccumulator(tolerance_px=4)
    for index in range(2):
        accumulator.update(torch.from_numpy(target[index]), torch.from_numpy(prediction[index]), crack)
    assert accumulator.counts == {"tp_pred": 60, "n_pred": 60, "tp_gt": 60, "n_gt": 60}
    assert accumulator.compute()["lt_iou"] == 1.0
    batched = ToleranceAccumulator(tolerance_px=4)
    batched.update(target, prediction, crack)  # a batch gives the same sums
    assert batched.counts == accumulator.counts
    accumulator.all_reduce()  # no-op without torch.distributed
    assert accumulator.counts["n_gt"] == 60
    accumulator.reset()
    assert all(math.isnan(value) for value in accumulator.compute().values())
