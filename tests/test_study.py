"""study.py: the grid's rows, test.py's numbers, resuming after kill -9, refusals; sensitivity; the
training crop never larger than the images."""
import copy
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from conftest import REPO, assert_user_error, run_script
from utils import data, model as models
from utils.cli import UserError
from utils.losses import SegmentationLoss
from utils.pruning import PruneData, prune_in_steps
from utils.study import layers_outside, network_parts, variant_grid


def study_command(checkpoint, dataset_dir, out, name="grid", ratios=("30", "60")):
    return ["study.py", "--state_dict", checkpoint, "--data", dataset_dir / "train", "--val_data",
            dataset_dir / "val", "--test_data", dataset_dir / "test", "--pruning_ratio", *ratios,
            "--importance_type", "Magnitude", "Taylor", "--finetune_epochs", "1", "--calib_batches", "1",
            "--batch_size", "2", "--crop_size", "64", "--measure_size", "64", "--latency_runs", "1",
            "--workers", "0", "--device", "cpu", "--name", name, "--output_dir", out]


def checkpoints(folder):
    """The variant checkpoints in place (temporary files being written start with a dot)."""
    return sorted(path.name for path in folder.glob("*.pth") if not path.name.startswith("."))


def start_and_kill_after_first_checkpoint(command, folder):
    """Run the study in a subprocess and SIGKILL it as soon as its first variant checkpoint is in place."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    process = subprocess.Popen([sys.executable, *map(str, command)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if folder.is_dir() and checkpoints(folder):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return checkpoints(folder)


def test_study_resumes_after_kill_and_matches_test_py(mobilenet_checkpoint, dataset_dir, tmp_path):
    out = tmp_path / "results"
    folder = out / "studies" / "grid"
    command = study_command(mobilenet_checkpoint, dataset_dir, out)
    saved = start_and_kill_after_first_checkpoint(command, folder)
    assert saved, "the study was killed before it saved a variant"
    first = folder / saved[0]
    first_written = first.stat().st_mtime_ns

    result = run_script(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    assert first.stat().st_mtime_ns == first_written, "the variant finished before the kill was pruned again"
    assert "reus" in result.stdout

    table = pd.read_csv(folder / "study.csv")
    assert len(table) == 5  # the dense row and 2 criteria x 2 ratios
    assert table["criterion"].iloc[0].startswith("dense")
    assert sorted(table["pruning_ratio"].iloc[1:]) == [30, 30, 60, 60]
    assert (table["gmacs"].iloc[1:] < table["gmacs"].iloc[0]).all()
    assert (folder / "study.xlsx").is_file() and (folder / "study.png").is_file()
    for name in table["variant"].iloc[1:]:
        checkpoint = torch.load(folder / f"{name}.pth", map_location="cpu", weights_only=True)
        assert checkpoint["pruning"] and checkpoint["study"]["digest"]

    row = table.iloc[3]
    scored = run_script("test.py", dataset_dir / "test", "--weights", folder / f"{row['variant']}.pth", "--workers",
                        "0", "--device", "cpu", "--output_dir", out / "tests")
    assert scored.returncode == 0, scored.stderr[-3000:]
    reported = pd.read_excel(out / "tests" / "model_test_results.xlsx", sheet_name="results").iloc[0]
    assert reported["mIoU"] == pytest.approx(row["test_miou"], abs=1e-12)
    assert reported["tolerance F1"] == pytest.approx(row["crack_tolerance_f1"], abs=1e-12)

    assert not [path for path in folder.iterdir() if path.name.startswith(".tmp_")], "stale temporaries left"
    written = {name: (folder / name).stat().st_mtime_ns for name in checkpoints(folder)}
    again = run_script(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished in an earlier run, reused") == 4
    assert {name: (folder / name).stat().st_mtime_ns for name in checkpoints(folder)} == written

    changed = run_script(*study_command(mobilenet_checkpoint, dataset_dir, out, ratios=("30", "50")))
    assert_user_error(changed, "other arguments", "pruning_ratio", "--overwrite")


@pytest.mark.parametrize("options, fragment", [
    (["--pruning_ratio", "100"], "between 0 and 99"),
    (["--pruning_ratio", "50", "--importance_type", "Magnitude", "Entropy"], "unknown --importance_type"),
    (["--pruning_ratio", "50", "--importance_type", "Taylor"], "Taylor needs --data"),
    (["--pruning_ratio", "50", "--iterative_steps", "0"], "--iterative_steps must be at least 1"),
    (["--pruning_ratio", "50", "--importance_type"], "expected at least one argument"),
])
def test_bad_grids_are_refused_in_one_line(mobilenet_checkpoint, dataset_dir, tmp_path, options, fragment):
    result = run_script("study.py", "--state_dict", mobilenet_checkpoint, "--test_data", dataset_dir / "test",
                        "--finetune_epochs", "0", "--name", "bad", "--output_dir", tmp_path, *options)
    assert_user_error(result, fragment)
    assert not (tmp_path / "studies").exists()


def test_grid_gives_p_only_to_criteria_that_have_a_norm():
    class Args:
        importance_type, p_value, pruning_ratio, iterative_steps = ["magnitude", "Taylor"], [1, 2], [20, 40], [1, 5]

    grid = variant_grid(Args)
    assert len(grid) == 2 * 2 * 2 + 2 * 2
    assert {variant.p_value for variant in grid if variant.importance == "Taylor"} == {None}
    assert len({variant.name for variant in grid}) == len(grid)


def test_sensitivity_prunes_only_the_part_asked_for(mobilenet_checkpoint):
    dense, _ = __import__("utils.checkpoint", fromlist=["load_model"]).load_model(mobilenet_checkpoint)
    parts = network_parts(dense)
    assert list(parts) == ["backbone", "ASPP", "head 3x3 conv"]
    model = copy.deepcopy(dense)

    class Args:
        importance_type, p_value, pruning_ratio, iterative_steps = "Magnitude", 2, 50, 1
        global_pruning, round_to, finetune_epochs, calib_batches, calib_mode, seed = False, None, 0, 1, "eval", 0

    prune_in_steps(model, Args, PruneData(), None, lambda *_: None, layers_outside(model, parts["ASPP"]))
    before, after = dict(dense.named_modules()), dict(model.named_modules())
    changed = {name for name, module in after.items() if isinstance(module, torch.nn.Conv2d)
               and module.weight.shape != before[name].weight.shape}
    assert changed and all(name.startswith(("classifier.0.", "classifier.1")) for name in changed)
    assert any(name.startswith("classifier.0.") and after[name].out_channels < before[name].out_channels
               for name in changed)
    assert all(after[name].out_channels == before[name].out_channels for name in changed
               if not name.startswith("classifier.0."))


def test_training_crop_never_exceeds_the_smallest_image(dataset_dir, capsys):
    clamped = data.training_set(dataset_dir / "train", 512)
    assert "64 px" in capsys.readouterr().out
    image, mask, _ = clamped[0]
    assert tuple(image.shape[-2:]) == (64, 64) and tuple(mask.shape) == (64, 64)
    smaller = data.training_set(dataset_dir / "train", 32)
    assert capsys.readouterr().out == ""
    assert tuple(smaller[0][0].shape[-2:]) == (32, 32)
