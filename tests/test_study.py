"""study.py: the grid's rows per seed with the dense and dense fine-tuned rows, mean/spread and the within-noise
verdict, test.py's numbers, resuming after kill -9, refusals; sensitivity; the training crop never larger than the
images."""
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
from utils import data
from utils.cli import UserError
from utils.finetune import PruneData
from utils.prune_ops import layers_outside, network_parts
from utils.pruning import PruneOptions, prune_in_steps
from utils.study.grid import variant_grid
from utils.study.plots import _error_bar, _plot_panel
from utils.study.tables import PER_SEED, format_table, summary_rows, table_rows


def study_command(checkpoint, dataset_dir, out, name="grid", ratios=("30", "50")):
    return ["study.py", "--state_dict", checkpoint, "--data", dataset_dir / "train", "--val_data",
            dataset_dir / "val", "--test_data", dataset_dir / "test", "--pruning_ratio", *ratios,
            "--importance_type", "Magnitude", "Random", "--seeds", "1", "2", "--finetune_steps", "2",
            "--calib_batches", "1",
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

    result = run_script(*command, timeout=1800)  # ten runs; a shared CPU can be slow
    assert result.returncode == 0, result.stderr[-3000:]
    assert first.stat().st_mtime_ns == first_written, "the variant finished before the kill was pruned again"
    assert "reus" in result.stdout

    table = pd.read_csv(folder / "study.csv")
    assert len(table) == 2 * (2 + 2 * 2)  # per seed: dense, dense fine-tuned, 2 criteria x 2 ratios
    assert sorted(table["seed"]) == [1] * 6 + [2] * 6
    for seed, rows in table.groupby("seed"):
        assert rows["variant"].value_counts().to_dict() == {name: 1 for name in rows["variant"]}
        assert {"dense", "dense_finetuned"} <= set(rows["variant"])
        twin = rows.set_index("variant").loc["dense_finetuned"]
        assert (rows["test_miou_change"] == rows["test_miou"] - twin["test_miou"]).all()
    assert table.loc[table["variant"] == "dense", "criterion"].str.contains("untuned").all()
    assert sorted(table.loc[table["pruning_ratio"] > 0, "pruning_ratio"]) == [30] * 4 + [50] * 4
    pruned = table["pruning_ratio"] > 0
    assert (table.loc[pruned, "gmacs"] < table.loc[~pruned, "gmacs"].min()).all()
    assert (folder / "study.png").is_file()
    summary = pd.read_excel(folder / "study.xlsx", sheet_name="summary", header=1)
    assert len(summary) == 2 + 4 and (summary["seeds"] == 2).all()
    for column in ("test mIoU", "test mIoU spread", "crack tolerance F1 spread", "mIoU change vs dense fine-tuned",
                   "mIoU: vs dense"):
        assert column in summary, column
    per_seed = pd.read_excel(folder / "study.xlsx", sheet_name="per seed", header=1)
    assert len(per_seed) == len(table)
    for name in table.loc[pruned, "run"]:
        checkpoint = torch.load(folder / f"{name}.pth", map_location="cpu", weights_only=True)
        assert checkpoint["pruning"] and checkpoint["study"]["digest"]
        assert checkpoint["study"]["seed"] == int(name.rsplit("seed", 1)[1])
    twin = torch.load(folder / "dense_finetuned_seed2.pth", map_location="cpu", weights_only=True)
    assert "pruning" not in twin and twin["study"]["seed"] == 2
    random_runs = [torch.load(folder / f"random_50pct_1step_seed{seed}.pth", map_location="cpu",
                              weights_only=True)["pruning"] for seed in (1, 2)]
    assert random_runs[0] != random_runs[1], "the random control removed the same channels for both seeds"

    row = table[table["run"] == "random_50pct_1step_seed2"].iloc[0]
    scored = run_script("test.py", dataset_dir / "test", "--weights", folder / f"{row['run']}.pth", "--workers",
                        "0", "--device", "cpu", "--output_dir", out / "tests")
    assert scored.returncode == 0, scored.stderr[-3000:]
    reported = pd.read_excel(out / "tests" / "model_test_results.xlsx", sheet_name="results").iloc[0]
    assert reported["mIoU"] == pytest.approx(row["test_miou"], abs=1e-12)
    assert reported["tolerance F1"] == pytest.approx(row["crack_tolerance_f1"], abs=1e-12)

    assert not [path for path in folder.iterdir() if path.name.startswith(".tmp_")], "stale temporaries left"
    written = {name: (folder / name).stat().st_mtime_ns for name in checkpoints(folder)}
    again = run_script(*command, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished in an earlier run, reused") == 10  # 5 runs (twin + 4 variants) x 2 seeds
    assert "pruning" not in again.stdout and "fine-tuning epoch" not in again.stdout
    assert {name: (folder / name).stat().st_mtime_ns for name in checkpoints(folder)} == written

    changed = run_script(*study_command(mobilenet_checkpoint, dataset_dir, out, ratios=("30", "60")))
    assert_user_error(changed, "other arguments", "pruning_ratio", "--overwrite")


@pytest.mark.parametrize("options, fragment", [
    (["--pruning_ratio", "100"], "between 0 and 99"),
    (["--pruning_ratio", "50", "--importance_type", "Magnitude", "Entropy"], "unknown --importance_type"),
    (["--pruning_ratio", "50", "--importance_type", "Taylor"], "Taylor needs --data"),
    (["--pruning_ratio", "50", "--iterative_steps", "0"], "--iterative_steps must be at least 1"),
    (["--pruning_ratio", "50", "--importance_type"], "expected at least one argument"),
    (["--pruning_ratio", "30", "50", "--seeds", "1", "2", "1"], "--seeds repeats 1"),
    (["--pruning_ratio", "50", "--seeds"], "expected at least one argument"),
    (["--pruning_ratio", "50", "--importance_type", "Magnitude", "Random", "--p_value", "1", "2"],
     "Random has no norm"),
])
def test_bad_grids_are_refused_in_one_line(mobilenet_checkpoint, dataset_dir, tmp_path, options, fragment):
    result = run_script("study.py", "--state_dict", mobilenet_checkpoint, "--test_data", dataset_dir / "test",
                        "--finetune_steps", "0", "--name", "bad", "--output_dir", tmp_path, *options)
    assert_user_error(result, fragment)
    assert not (tmp_path / "studies").exists()


def test_grid_gives_p_only_to_criteria_that_have_a_norm():
    grid = variant_grid(["magnitude", "Taylor"], [1, 2], [20, 40], [1, 5])
    assert len(grid) == 2 * 2 * 2 + 2 * 2
    assert {variant.p_value for variant in grid if variant.importance == "Taylor"} == {None}
    assert len({variant.name for variant in grid}) == len(grid)


def test_grid_takes_random_as_a_control_without_a_norm():
    grid = variant_grid(["Magnitude", "random"], [1], [30, 50], [1])
    assert [variant.name for variant in grid] == ["magnitude_l1_30pct_1step", "magnitude_l1_50pct_1step",
                                                  "random_30pct_1step", "random_50pct_1step"]
    with pytest.raises(UserError, match="the grid is empty"):
        variant_grid([], [2], [30], [1])


def _run(variant, seed, miou, f1, ratio=50.0):
    return {"variant": variant, "run": f"{variant}_seed{seed}", "seed": seed, "criterion": variant, "p_value": None,
            "pruning_ratio": ratio, "steps": 1, "family": variant, "macs": 2e9, "params": 1e6, "best_step": 1,
            "val_miou": miou, "test_miou": miou, "crack_iou": f1, "crack_tolerance_f1": f1, "latency_ms": 10.0,
            "speedup": 1.0, "target_gmacs": None, "plan": None, "precision": "float32", "int8_agreement": None}


def test_changes_are_against_the_fine_tuned_twin_and_small_ones_are_marked_within_noise():
    rows = [_run("dense", 1, 0.50, 0.30, 0.0), _run("dense", 2, 0.50, 0.30, 0.0),
            _run("dense_finetuned", 1, 0.60, 0.40, 0.0), _run("dense_finetuned", 2, 0.64, 0.44, 0.0),
            _run("close", 1, 0.61, 0.20), _run("close", 2, 0.62, 0.22),     # +0.005 mIoU, spread 0.028
            _run("worse", 1, 0.40, 0.41), _run("worse", 2, 0.41, 0.45)]     # -0.215 mIoU
    table = table_rows(rows)
    assert [row["test_miou_change"] for row in table[:2]] == pytest.approx([-0.10, -0.14])  # dense vs its twin
    summary = {row["variant"]: row for row in summary_rows(table)}
    assert summary["close"]["test_miou_mean"] == pytest.approx(0.615)
    assert summary["close"]["test_miou_spread"] == pytest.approx(0.01 / 2 ** 0.5)
    assert summary["close"]["test_miou_change_mean"] == pytest.approx(-0.005)
    assert summary["close"]["test_miou_verdict"] == "within noise"  # twin spread 0.028 > 0.005
    assert summary["worse"]["test_miou_verdict"] == "below dense (beyond noise)"
    assert summary["close"]["crack_tolerance_f1_verdict"] == "below dense (beyond noise)"
    assert summary["dense_finetuned"]["test_miou_verdict"] == "reference"
    twin_seeds = [_run("dense_finetuned", seed, 0.60, 0.40, 0.0) for seed in (1, 2)]  # zero spread
    hair = {row["variant"]: row for row in summary_rows(table_rows(
        twin_seeds + [_run("hair", seed, 0.59996, 0.39, 0.0) for seed in (1, 2)]))}["hair"]
    assert hair["test_miou_verdict"] == "within noise"  # -0.004 points shows as -0.00%: not a difference
    assert hair["crack_tolerance_f1_verdict"] == "below dense (beyond noise)"  # -1 point, zero spread: real
    single = summary_rows(table_rows([row for row in rows if row["seed"] == 1]))
    assert {row["test_miou_verdict"] for row in single} == {"reference", "one seed: no spread"}
    printed = format_table(summary_rows(table)).splitlines()  # mean ± spread, changes signed, in percent
    assert printed[0].split()[:3] == ["variant", "seeds", "GMACs"] and "mIoU vs dense ft" in printed[0]
    assert "-0.50% ± 2.12%" in printed[3] and "within noise" in printed[3] and printed[3].startswith("close ")
    assert "+0.00%" in printed[2] and "reference" in printed[2]
    with pytest.raises(KeyError, match="unknown"):  # a key the table does not know is refused
        PER_SEED.row({"unknown": 1})


def test_plot_labels_collapsed_points_once_and_cuts_bars_at_zero():
    import matplotlib.pyplot as plt
    twins = [_run(name, seed, 0.25, 0.11, 0.0) for name in ("dense", "dense_finetuned") for seed in (1, 2)]
    collapsed = [_run(name, seed, 0.0023, 0.03, ratio) for name, ratio in (("l2_30", 30.0), ("random_30", 30.0),
                                                                          ("random_50", 50.0)) for seed in (1, 2)]
    young = [_run("taylor_30", 1, 0.02, 0.05, 30.0), _run("taylor_30", 2, 0.12, 0.09, 30.0)]
    summary = summary_rows(table_rows(twins + collapsed + young))
    figure, axis = plt.subplots()
    _plot_panel(axis, summary, "gmacs", "test_miou")
    labels = sorted(text.get_text() for text in axis.texts)
    plt.close(figure)
    assert labels == ["30%", "30%, 50%"]  # taylor's 7% (far from 0.23%) keeps its own; the three collapsed share one
    taylor = next(row for row in summary if row["variant"] == "taylor_30")
    lower, upper = _error_bar([taylor], "test_miou")
    assert taylor["test_miou_spread"] == pytest.approx(0.1 / 2 ** 0.5)
    assert lower == pytest.approx([7.0]) and upper == pytest.approx([100 * 0.1 / 2 ** 0.5])  # 7 - 7.07 < 0: cut


def test_sensitivity_prunes_only_the_part_asked_for(mobilenet_checkpoint):
    dense, _ = __import__("utils.checkpoint", fromlist=["load_model"]).load_model(mobilenet_checkpoint)
    parts = network_parts(dense)
    assert list(parts) == ["backbone", "ASPP", "head 3x3 conv"]
    model = copy.deepcopy(dense)

    options = PruneOptions(importance_type="Magnitude", p_value=2, pruning_ratio=50, iterative_steps=1,
                           global_pruning=False, round_to=None, calib_batches=1, calib_mode="eval", seed=0, workers=0)
    prune_in_steps(model, options, PruneData(), None, lambda *_: None, layers_outside(model, parts["ASPP"]))
    before, after = dict(dense.named_modules()), dict(model.named_modules())
    changed = {name for name, module in after.items() if isinstance(module, torch.nn.Conv2d)
               and module.weight.shape != before[name].weight.shape}
    assert changed and all(name.startswith(("classifier.0.", "classifier.1")) for name in changed)
    assert any(name.startswith("classifier.0.") and after[name].out_channels < before[name].out_channels
               for name in changed)
    assert all(after[name].out_channels == before[name].out_channels for name in changed
               if not name.startswith("classifier.0."))


def test_study_options_are_checked_and_settled_when_made(mobilenet_checkpoint, dataset_dir, capsys):
    """study.py's checks run as StudyOptions is made from the command line: --device auto resolved, --workers capped
    (one note), frozen afterwards; a bad value is a UserError before anything is loaded."""
    import dataclasses

    import study
    from utils.cli import options_from, usable_cpus
    from utils.study import StudyOptions

    argv = ["--state_dict", str(mobilenet_checkpoint), "--test_data", str(dataset_dir / "test"), "--pruning_ratio",
            "30", "50", "--name", "checked", "--finetune_steps", "0", "--workers", "1000"]
    options = options_from(StudyOptions, vars(study.get_args_parser().parse_args(argv)))
    assert options.device in ("cpu", "cuda") and options.workers == usable_cpus()
    assert options.pruning_ratio == (30.0, 50.0) and options.seed == 42
    assert capsys.readouterr().out.count("note: --workers 1000") == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.device = "cpu"
    with pytest.raises(UserError, match="--val_data"):
        options_from(StudyOptions, vars(study.get_args_parser().parse_args(argv + ["--finetune_steps", "1",
                                                                                 "--data", "x"])))


def test_training_crop_never_exceeds_the_smallest_image(dataset_dir, capsys):
    clamped = data.training_set(dataset_dir / "train", 512)
    assert "64 px" in capsys.readouterr().out
    image, mask, _ = clamped[0]
    assert tuple(image.shape[-2:]) == (64, 64) and tuple(mask.shape) == (64, 64)
    smaller = data.training_set(dataset_dir / "train", 32)
    assert capsys.readouterr().out == ""
    assert tuple(smaller[0][0].shape[-2:]) == (32, 32)


def test_a_run_finished_before_a_column_existed_is_shown_as_not_measured(capsys):
    """A resumed study's manifest holds rows made by an earlier version: a column added since is "-", not a
    KeyError that loses the whole table."""
    rows = [_run("dense", 1, 0.5, 0.3, 0.0), _run("dense_finetuned", 1, 0.6, 0.4, 0.0), _run("old", 1, 0.55, 0.35)]
    del rows[2]["int8_agreement"]
    table = table_rows(rows)
    assert table[2]["int8_agreement"] is None and table[1]["int8_agreement"] is None
    assert "lack int8_agreement" in capsys.readouterr().out
