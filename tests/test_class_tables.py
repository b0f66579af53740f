"""A dataset with its own classes (classes.csv): a binary crack set as Crack500/DeepCrack/CFD come trains, is
scored, pruned and run with its two classes named everywhere, from the checkpoint, not from S2DS's table."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import inference
import test as test_script
import torchvision_pruning
import train
from conftest import assert_user_error, run_script
from utils.checkpoint import checkpoint_classes, load_model
from utils.synthetic import generate

MOBILENET = ["--arch", "lraspp_mobilenet_v3_large"]
FAST = ["--batch_size", "2", "--crop_size", "64", "--init", "none", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory):
    """(dataset folder, output folder) after train.py on a generated binary crack set."""
    root = tmp_path_factory.mktemp("binary")
    data_dir, out = root / "data", root / "out"
    generate(data_dir, count=10, size=64, seed=5, splits=(("train", 0.6), ("val", 0.2), ("test", 0.2)), binary=True)
    train.main([str(data_dir / "train"), str(data_dir / "val"), "binary", *FAST, *MOBILENET, "--epochs", "1",
                "--loss", "ce_weighted", "--skeleton_recall", "1", "--output_dir", str(out)])
    return data_dir, out


def test_training_records_the_datasets_two_classes(binary_run):
    _, out = binary_run
    model, metadata = load_model(out / "runs" / "binary" / "best.pth")
    assert checkpoint_classes(metadata).names == ("background", "crack")
    assert model(torch.zeros(1, 3, 64, 64))["out"].shape[1] == 2
    metrics = pd.read_csv(out / "runs" / "binary" / "metrics.csv")
    assert {"val_iou_background", "val_iou_crack"} <= set(metrics.columns)
    assert not any(column.startswith("val_iou_spalling") for column in metrics.columns)
    assert json.loads((out / "runs" / "binary" / "args.json").read_text())["skeleton_recall"] == 1


def test_the_workbook_names_two_classes_and_reports_crack_tolerance_f1(binary_run):
    data_dir, out = binary_run
    test_script.main([str(data_dir / "test"), "--weights", str(out / "runs" / "binary" / "best.pth"), "--device",
                      "cpu", "--workers", "0", "--name", "binary", "--output_dir", str(out)])
    per_class = pd.read_excel(out / "test" / "binary.xlsx", sheet_name="per_class")
    assert list(per_class["class"]) == ["background", "crack"]
    summary = pd.read_excel(out / "test" / "binary.xlsx", sheet_name="summary")
    items = dict(zip(summary["item"], summary["value"]))
    assert items["classes"] == "background, crack" and "crack tolerance F1 (4 px)" in items
    confusion = pd.read_excel(out / "test" / "binary.xlsx", sheet_name="confusion_matrix", header=None)
    assert confusion.shape[1] == 3  # the ground-truth names and two prediction columns


def test_a_network_of_other_classes_is_refused_on_this_data(binary_run, mobilenet_checkpoint, capsys):
    data_dir, out = binary_run
    result = run_script("test.py", data_dir / "test", "--weights", mobilenet_checkpoint, "--device", "cpu",
                        "--output_dir", out)
    assert_user_error(result, "predicts 7 classes", "has 2 (background, crack)")


def test_masks_and_figures_use_the_checkpoints_colours(binary_run, tmp_path):
    data_dir, out = binary_run
    photo = next((data_dir / "test" / "Images").iterdir())
    inference.main(["--state_dict", str(out / "runs" / "binary" / "best.pth"), "--image", str(photo), "--mode",
                    "save_mask", "overlay", "--save_figure", "--device", "cpu", "--output_dir", str(tmp_path),
                    "--name", "binary"])
    ids = np.array(Image.open(tmp_path / "inference" / f"{photo.stem}_binary_mask.png"))
    rgb = np.array(Image.open(tmp_path / "inference" / f"{photo.stem}_binary_mask_rgb.png"))
    assert set(np.unique(ids)) <= {0, 1}
    np.testing.assert_array_equal(rgb[ids == 1], np.full(((ids == 1).sum(), 3), 255))  # crack is white here
    np.testing.assert_array_equal(rgb[ids == 0], np.zeros(((ids == 0).sum(), 3)))
    assert (tmp_path / "inference" / f"{photo.stem}_binary_overlay.png").is_file()


def test_pruning_keeps_the_classes_and_refuses_data_of_others(binary_run, dataset_dir, tmp_path):
    data_dir, out = binary_run
    best = out / "runs" / "binary" / "best.pth"
    common = ["--state_dict", str(best), "--pruning_ratio", "30", "--latency_runs", "0", "--measure_size", "64",
              "--device", "cpu", "--workers", "0", "--output_dir", str(tmp_path)]
    torchvision_pruning.main([*common, "--val_data", str(data_dir / "val"), "--model_name", "binary_30"])
    model, metadata = load_model(tmp_path / "pruned" / "binary_30.pth")
    assert checkpoint_classes(metadata).names == ("background", "crack")
    assert model(torch.zeros(1, 3, 64, 64))["out"].shape[1] == 2
    result = run_script("torchvision_pruning.py", *common, "--val_data", dataset_dir / "val", "--model_name", "other")
    assert_user_error(result, "predicts 2 classes", "has 7")


def test_an_onnx_graph_carries_the_class_table_and_scores_like_its_checkpoint(binary_run, tmp_path):
    import export
    data_dir, out = binary_run
    best, graph = out / "runs" / "binary" / "best.pth", tmp_path / "binary.onnx"
    export.main([str(best), "--output", str(graph), "--size", "64", "--device", "cpu", "--quiet"])
    scores = {}
    for name, weights in (("pth", best), ("onnx", graph)):
        test_script.main([str(data_dir / "test"), "--weights", str(weights), "--device", "cpu", "--workers", "0",
                          "--name", name, "--output_dir", str(tmp_path)])
        per_class = pd.read_excel(tmp_path / "test" / f"{name}.xlsx", sheet_name="per_class")
        assert list(per_class["class"]) == ["background", "crack"]
        scores[name] = pd.to_numeric(per_class["IoU"], errors="coerce").to_numpy()
    np.testing.assert_allclose(scores["onnx"], scores["pth"], atol=1e-3)  # fractions: within 0.1 points
