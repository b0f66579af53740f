"""A new architecture is one entry of utils.model.ARCHS: torchvision's FCN-ResNet50 trains, resumes, prunes (by ratio
and to a GMACs budget), is tested, exported with ONNX parity and runs in a study, every checkpoint reloading."""
import pytest
import torch

import torchvision_pruning
from conftest import run_script
from utils import model as models
from utils.checkpoint import load_model

ARCH = "fcn_resnet50"
FAST = ["--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def fcn_run(dataset_dir, tmp_path_factory):
    """An FCN-ResNet50 trained one epoch at output stride 16, then resumed for a second."""
    out = tmp_path_factory.mktemp("fcn")
    common = [dataset_dir / "train", dataset_dir / "val", "fcn", "--output_dir", out, *FAST]
    first = run_script("train.py", *common, "--arch", ARCH, "--init", "none", "--output_stride", "16", "--epochs",
                       "1", "--batch_size", "2", "--crop_size", "32")
    assert first.returncode == 0, first.stderr[-2000:]
    resumed = run_script("train.py", *common, "--resume", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return out


def test_fcn_trains_and_resumes_and_reloads_at_its_stride(fcn_run):
    network, metadata = load_model(fcn_run / "runs" / "fcn" / "last.pth")
    assert metadata["arch"] == ARCH and metadata["epoch"] == 2 and metadata["output_stride"] == 16
    assert models.output_stride(network) == 16 and network.aux_classifier is not None
    with torch.no_grad():
        assert network(torch.randn(1, 3, 32, 32))["out"].shape == (1, 7, 32, 32)


def test_fcn_prunes_by_ratio_and_to_a_budget_and_tests(fcn_run, dataset_dir, monkeypatch, tmp_path):
    from utils import planning

    best = fcn_run / "runs" / "fcn" / "best.pth"
    common = ["--state_dict", str(best), "--measure_size", "64", "--latency_runs", "0", "--output_dir",
              str(tmp_path), *FAST]
    by_ratio = torchvision_pruning.main(["--pruning_ratio", "40", "--model_name", "ratio", *common])
    dense_gmacs = models.count_macs(load_model(best)[0], 64)[0] / 1e9
    monkeypatch.setattr(planning, "RATIO_STEP", 45)  # 45 and 90% per part: few probes
    target = round(0.7 * dense_gmacs, 3)
    budgeted = torchvision_pruning.main(["--target_gmacs", str(target), "--val_data", str(dataset_dir / "val"),
                                         "--data", str(dataset_dir / "train"), "--bn_recalibrate", "1",
                                         "--batch_size", "2", "--crop_size", "32", "--model_name", "budget", *common])
    for path in (by_ratio, budgeted):
        network, metadata = load_model(path)
        assert metadata["arch"] == ARCH and metadata["output_stride"] == 16
    assert "FCN head 3x3 conv" in load_model(budgeted)[1]["part_ratios"]
    assert load_model(budgeted)[1]["macs"] <= target * 1e9
    tested = run_script("test.py", dataset_dir / "test", "--weights", by_ratio, "--output_dir", tmp_path, *FAST)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert (tmp_path / "test" / "ratio.xlsx").is_file()


def test_fcn_exports_with_parity_and_runs_in_a_study(fcn_run, dataset_dir, tmp_path):
    best = fcn_run / "runs" / "fcn" / "best.pth"
    exported = run_script("export.py", best, "--size", "64", "--output", tmp_path / "fcn.onnx")
    assert exported.returncode == 0, exported.stderr[-2000:] + exported.stdout[-2000:]
    assert (tmp_path / "fcn.onnx").is_file() and "parity" in exported.stdout.lower()
    studied = run_script("study.py", "--state_dict", best, "--data", dataset_dir / "train", "--val_data",
                         dataset_dir / "val", "--test_data", dataset_dir / "test", "--pruning_ratio", "30",
                         "--finetune_steps", "1", "--bn_recalibrate", "1", "--batch_size", "2", "--crop_size", "32",
                         "--measure_size", "64", "--latency_runs", "0", "--name", "fcn", "--output_dir", tmp_path,
                         *FAST)
    assert studied.returncode == 0, studied.stderr[-2000:]
    assert (tmp_path / "studies" / "fcn" / "study.csv").is_file()
