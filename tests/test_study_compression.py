"""study.py's compression axes: --target_gmacs (a per-part plan against uniform pruning of equal GMACs, both
fine-tuned alike) and --int8 (an INT8 row per variant, scored as test.py scores the .onnx, timed beside the rest)."""
import pandas as pd
import pytest
import torch

from conftest import assert_user_error, run_script
from utils.checkpoint import load_model
from utils.cli import UserError
from utils.planning import Budget, uniform_ratio_for
from utils.pruning import PruneOptions
from utils.study.grid import variant_grid

BUDGET = 0.09  # GMACs at 64 px; the untrained DeepLabV3-MobileNetV3 costs 0.156


def test_each_budget_adds_a_uniform_and_a_budgeted_variant_per_criterion():
    grid = variant_grid(["Magnitude", "Random"], [2], [50], [1], target_gmacs=[2.5])
    assert [variant.name for variant in grid] == [
        "magnitude_l2_50pct_1step", "magnitude_l2_2.5gmacs_uniform_1step", "magnitude_l2_2.5gmacs_budgeted_1step",
        "random_50pct_1step", "random_2.5gmacs_uniform_1step", "random_2.5gmacs_budgeted_1step"]
    # one uniform ratio per budget, whatever the criterion; a plan per criterion
    assert grid[1].budget_key == grid[4].budget_key and grid[2].budget_key != grid[5].budget_key
    assert grid[0].budget_key is None
    # the uniform network of the budget's GMACs lies on its criterion's uniform line; the plans have their own
    assert grid[1].family == grid[0].family and grid[2].family == "Magnitude L2, budgeted, 1 step"
    assert [variant.name for variant in variant_grid(["Magnitude"], [2], [], [1], [2])] == [
        "magnitude_l2_2gmacs_uniform_1step", "magnitude_l2_2gmacs_budgeted_1step"]
    with pytest.raises(UserError, match="positive number of GMACs"):
        variant_grid(["Magnitude"], [2], [50], [1], [0])
    with pytest.raises(UserError, match="--pruning_ratio or a --target_gmacs"):
        variant_grid(["Magnitude"], [2], [], [1], [])


def test_a_budget_uniform_pruning_cannot_meet_is_refused_in_one_line(mobilenet_checkpoint):
    """(That the ratio found just meets a reachable budget is checked on the study's rows below.)"""
    dense, _ = load_model(mobilenet_checkpoint)
    tuning = PruneOptions(importance_type="Magnitude", p_value=2, pruning_ratio=None, iterative_steps=1,
                          global_pruning=False, round_to=None, calib_batches=1, calib_mode="eval", seed=0, workers=0)
    with pytest.raises(UserError, match="not below the dense network's 0.156 GMACs"):
        uniform_ratio_for(Budget("gmacs", 0.2, 64, "cpu", 0), dense, tuning)
    with pytest.raises(UserError, match="below what uniform pruning reaches"):
        uniform_ratio_for(Budget("gmacs", 0.001, 64, "cpu", 0), dense, tuning)


def _study(checkpoint, dataset_dir, out, *extra):
    return ["study.py", "--state_dict", checkpoint, "--data", dataset_dir / "train", "--val_data",
            dataset_dir / "val", "--test_data", dataset_dir / "test", "--importance_type", "Magnitude", "--seeds", "1",
            "--finetune_steps", "0", "--batch_size", "2", "--crop_size", "64", "--measure_size", "64",
            "--latency_runs", "1", "--workers", "0", "--device", "cpu", "--name", "budget", "--output_dir", out,
            *extra]


def test_budgeted_and_uniform_meet_the_budget_and_int8_rows_score_as_test_py(lively_mobilenet_checkpoint,
                                                                             dataset_dir, tmp_path):
    out, budgeted_name = tmp_path / "results", "magnitude_l2_0.09gmacs_budgeted_1step"
    folder = out / "studies" / "budget"
    command = _study(lively_mobilenet_checkpoint, dataset_dir, out, "--target_gmacs", str(BUDGET), "--int8",
                     budgeted_name, "--calib_images", "2", "--int8_weights", "per_channel")
    result = run_script(*command, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 weights per-channel" in result.stdout  # export.py's recipe flags reach the study's INT8 graphs
    table = pd.read_csv(folder / "study.csv").set_index("variant")
    uniform, budgeted = table.loc["magnitude_l2_0.09gmacs_uniform_1step"], table.loc[budgeted_name]
    for row in (uniform, budgeted):  # within 3% at or below the budget, both
        assert 0.97 * BUDGET <= row["gmacs"] <= BUDGET and row["target_gmacs"] == BUDGET
    assert 0 < uniform["pruning_ratio"] < 90 and pd.isna(uniform["plan"])
    assert pd.isna(budgeted["pruning_ratio"]) and budgeted["plan"].startswith("backbone ")
    saved = torch.load(folder / f"{budgeted['run']}.pth", map_location="cpu", weights_only=True)
    assert set(saved["part_ratios"]) == {"backbone", "ASPP", "head 3x3 conv"} and saved["target_gmacs"] == BUDGET
    assert torch.load(folder / f"{uniform['run']}.pth", map_location="cpu",
                      weights_only=True)["pruning_ratio"] == uniform["pruning_ratio"]

    int8 = table.loc[budgeted_name + "_int8"]
    assert list(table["precision"]).count("int8") == 1  # only the variant named after --int8
    assert int8["precision"] == "int8" and int8["gmacs"] == budgeted["gmacs"] and 0.5 < int8["int8_agreement"] <= 1
    assert int8["latency_ms"] > 0 and int8["test_miou_change"] == int8["test_miou"] - table.loc[
        "dense_finetuned", "test_miou"]
    onnx = table.loc[budgeted_name + "_onnx"]  # INT8's control: the same graph in float32, the same runtime
    assert onnx["precision"] == "float32 (onnxruntime)" and pd.isna(onnx["int8_agreement"]) and onnx["latency_ms"] > 0
    assert onnx["test_miou"] == pytest.approx(budgeted["test_miou"], abs=1e-3)  # the checkpoint's, within 0.1 points
    assert (folder / f"{onnx['run']}.onnx").is_file()
    scored = run_script("test.py", dataset_dir / "test", "--weights", folder / f"{int8['run']}.onnx", "--workers",
                        "0", "--device", "cpu", "--output_dir", out / "tests")
    assert scored.returncode == 0, scored.stderr[-3000:]
    reported = pd.read_excel(out / "tests" / "model_test_results.xlsx", sheet_name="results").iloc[0]
    assert reported["mIoU"] == pytest.approx(int8["test_miou"], abs=1e-12)
    summary = pd.read_excel(folder / "study.xlsx", sheet_name="summary", header=1)
    assert {"GMACs budget", "per-part ratios (budgeted)", "precision"} <= set(summary.columns)
    assert not [path for path in folder.iterdir() if path.name.startswith(".tmp")], "temporaries left"

    again = run_script(*command, timeout=1800)  # resumed: no plan, bisection, pruning or export again
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished in an earlier run, reused") == 4  # twin, uniform, budgeted, ONNX + INT8
    assert "planning" not in again.stdout and "quantising" not in again.stdout


@pytest.mark.parametrize("options, fragment", [
    (["--target_gmacs", "1", "--global_pruning"], "drop one of them"),
    (["--pruning_ratio", "50", "--int8", "magnitude_l2_60pct_1step"], "no such variant in this grid"),
    (["--pruning_ratio", "50", "--int8", "--measure_size", "60"], "multiple of 8"),
    (["--pruning_ratio", "50", "--int8_calibration", "percentile"], "only used with --int8"),
])
def test_bad_compression_options_are_refused_in_one_line(mobilenet_checkpoint, dataset_dir, tmp_path, options,
                                                          fragment):
    result = run_script(*_study(mobilenet_checkpoint, dataset_dir, tmp_path, *options))
    assert_user_error(result, fragment)
    assert not (tmp_path / "studies").exists()


def test_a_budget_the_network_cannot_meet_is_refused_before_any_variant_runs(mobilenet_checkpoint, dataset_dir,
                                                                             tmp_path):
    result = run_script(*_study(mobilenet_checkpoint, dataset_dir, tmp_path, "--target_gmacs", "5"))
    assert_user_error(result, "--target_gmacs 5 is not below the dense network's")
    assert not list((tmp_path / "studies" / "budget").glob("*.pth"))
