"""train.py end to end on tiny generated data: outputs, resume after kill -9, freezing, refusals, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import train
from conftest import REPO, assert_user_error, run_script
from utils import data, model as models
from utils.checkpoint import TRAINING_STATE, load_model, make_checkpoint, save_atomic
from utils.synthetic import generate

FAST = ["--batch_size", "2", "--crop_size", "64", "--init", "none", "--device", "cpu", "--workers", "0"]
MOBILE = ["--arch", "deeplabv3_mobilenet_v3_large"]


def train_args(dataset_dir, out, name, *extra):
    return [str(dataset_dir / "train"), str(dataset_dir / "val"), name, *FAST, "--output_dir", str(out), *extra]


def test_default_arch_run_writes_every_output(dataset_dir, tmp_path):
    train.main(train_args(dataset_dir, tmp_path, "run1", "--epochs", "2"))
    run = tmp_path / "runs" / "run1"
    assert {"last.pth", "best.pth", "metrics.csv", "curves.png", "args.json"} <= set(os.listdir(run))
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2]
    expected = {"train_loss", "val_loss", "val_miou", "lr", "data_seconds", "compute_seconds"}
    assert expected | {f"val_iou_{name}" for name in data.CLASS_NAMES} <= set(metrics.columns)
    best = torch.load(run / "best.pth", weights_only=True)
    assert best["arch"] == "deeplabv3_resnet101" and best["epoch"] == int(metrics["val_miou"].idxmax()) + 1
    assert json.loads((run / "args.json").read_text())["epochs"] == 2
    model, metadata = load_model(run / "last.pth")
    assert metadata["epoch"] == 2 and isinstance(model, torch.nn.Module)


def test_training_learns_on_a_learnable_dataset(tmp_path):
    generate(tmp_path / "ds", count=30, size=64, seed=1, splits=(("train", 0.7), ("val", 0.3)))
    args = [str(tmp_path / "ds" / "train"), str(tmp_path / "ds" / "val"), "learn", *FAST, "--arch",
            "deeplabv3_resnet50", "--output_stride", "16", "--batch_size", "4", "--epochs", "4", "--optimizer",
            "adamw", "--lr", "0.003",
            "--output_dir", str(tmp_path)]
    train.main(args)
    metrics = pd.read_csv(tmp_path / "runs" / "learn" / "metrics.csv")
    assert metrics["train_loss"].iloc[-3:].mean() < metrics["train_loss"].iloc[0]
    assert metrics["val_miou"].iloc[1:].max() > metrics["val_miou"].iloc[0]


def test_resume_after_kill_finishes_every_epoch_once(dataset_dir, tmp_path):
    command = [sys.executable, "train.py", *train_args(dataset_dir, tmp_path, "killed", *MOBILE, "--epochs", "3")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv = tmp_path / "runs" / "killed" / "metrics.csv"
    deadline = time.time() + 300
    while not csv.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(pd.read_csv(csv)) == 1 and not (tmp_path / "runs" / "killed" / "curves.png").with_suffix(".tmp").exists()
    result = subprocess.run(command + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming" in result.stdout
    assert pd.read_csv(csv)["epoch"].tolist() == [1, 2, 3]
    for name in ("best.pth", "last.pth"):
        load_model(tmp_path / "runs" / "killed" / name)
    assert not [f for f in os.listdir(csv.parent) if f.startswith(".tmp_")]


def test_keep_feature_extract_leaves_backbone_untouched(dataset_dir, tmp_path):
    torch.manual_seed(0)
    start = models.build("deeplabv3_mobilenet_v3_large", 7, init="none")
    save_atomic(make_checkpoint(start, "deeplabv3_mobilenet_v3_large"), tmp_path / "start.pth")
    train.main(train_args(dataset_dir, tmp_path, "frozen", *MOBILE, "--epochs", "1", "--keep_feature_extract",
                          "True", "--load_pretrained_weights", str(tmp_path / "start.pth")))
    after = torch.load(tmp_path / "runs" / "frozen" / "last.pth", weights_only=True)["model"]
    before = start.state_dict()
    backbone = [k for k in before if k.startswith("backbone.")]
    assert backbone and all(torch.equal(before[k], after[k]) for k in backbone)
    assert not torch.equal(before["classifier.4.weight"], after["classifier.4.weight"])


def test_finished_run_is_refused_without_resume_or_overwrite(dataset_dir, tmp_path):
    args = train_args(dataset_dir, tmp_path, "done", *MOBILE, "--epochs", "1")
    train.main(args)
    last = tmp_path / "runs" / "done" / "last.pth"
    before = last.read_bytes()
    assert_user_error(run_script("train.py", *args), "already holds a run", "--resume", "--overwrite")
    assert last.read_bytes() == before
    assert_user_error(run_script("train.py", *args[:2], "fresh", *args[3:], "--resume"), "nothing to resume")


def test_overwrite_replaces_a_run(dataset_dir, tmp_path):
    args = train_args(dataset_dir, tmp_path, "again", *MOBILE, "--epochs", "1")
    train.main(args)
    train.main(args + ["--overwrite", "--epochs", "2"])
    assert pd.read_csv(tmp_path / "runs" / "again" / "metrics.csv")["epoch"].tolist() == [1, 2]


@pytest.mark.parametrize("problem, fragment", [
    ("missing_folder", "not found"),
    ("no_images", "has no Images/"),
    ("image_without_label", "has no label"),
    ("unknown_colour", "unknown label colour"),
    ("size_mismatch", "size mismatch"),
    ("corrupt_png", "cannot read image"),
])
def test_bad_datasets_give_one_line(tmp_path, problem, fragment):
    generate(tmp_path / "ds", count=6, size=32, seed=0)
    split = tmp_path / "ds" / "train"
    if problem == "missing_folder":
        split = tmp_path / "nowhere"
    elif problem == "no_images":
        (split / data.IMAGE_DIR).rename(split / "Pictures")
    elif problem == "image_without_label":
        (split / data.GRAY_DIR / "000.png").unlink()
    elif problem == "unknown_colour":
        (split / data.GRAY_DIR).rename(tmp_path / "gray")
        Image.fromarray(np.full((32, 32, 3), (255, 0, 255), dtype=np.uint8)).save(split / data.RGB_DIR / "001.png")
    elif problem == "size_mismatch":
        Image.fromarray(np.zeros((20, 32), dtype=np.uint8)).save(split / data.GRAY_DIR / "001.png")
    elif problem == "corrupt_png":
        path = split / data.IMAGE_DIR / "001.png"
        path.write_bytes(path.read_bytes()[:120])
    result = run_script("train.py", split, tmp_path / "ds" / "val", "bad", *FAST, *MOBILE, "--epochs", "1",
                        "--workers", "1", "--output_dir", tmp_path / "out")
    assert_user_error(result, fragment)


def test_torchrun_two_cpu_processes_write_one_set_of_outputs(dataset_dir, tmp_path):
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "train.py", *train_args(dataset_dir, tmp_path, "ddp", *MOBILE, "--epochs", "2"))
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert result.stdout.count("epoch 2/2") == 1
    state = torch.load(run / "last.pth", weights_only=True)
    assert state["args"]["run_name"] == "ddp" and not any(k.startswith("module.") for k in state["model"])
    assert json.loads((run / "args.json").read_text())["world_size"] == 2


def test_resume_takes_the_runs_own_settings_and_builds_no_pretrained_weights(dataset_dir, tmp_path, monkeypatch):
    split = [dataset_dir / "train", dataset_dir / "val", "own"]
    system = ["--device", "cpu", "--workers", "0", "--output_dir", tmp_path]
    train.main(list(map(str, split + system)) + [*MOBILE, "--init", "none", "--epochs", "1", "--batch_size", "2",
                                                  "--crop_size", "64", "--optimizer", "adamw", "--lr", "0.003"])
    run = tmp_path / "runs" / "own"
    last = torch.load(run / "last.pth", weights_only=True)
    last["args"]["init"] = "coco"  # as a real run's: resuming must not build (download) what last.pth replaces
    save_atomic(last, run / "last.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no_weights_here"))
    resumed = run_script("train.py", *split, *system, "--resume", "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "\r" not in resumed.stderr  # no progress bars without a terminal
    saved = json.loads((run / "args.json").read_text())
    assert (saved["arch"], saved["optimizer"], saved["lr"], saved["crop_size"], saved["epochs"]) == (
        MOBILE[1], "adamw", 0.003, 64, 2)
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2]
    assert_user_error(run_script("train.py", *split, *system, "--resume", "--lr", "0.1"),
                      "--lr 0.1 contradicts", "0.003")


def test_best_holds_what_deployment_needs_and_last_what_resuming_needs(dataset_dir, tmp_path):
    train.main(train_args(dataset_dir, tmp_path, "slim", *MOBILE, "--epochs", "1", "--optimizer", "adamw"))
    best = torch.load(tmp_path / "runs" / "slim" / "best.pth", weights_only=True)
    last = torch.load(tmp_path / "runs" / "slim" / "last.pth", weights_only=True)
    assert not set(TRAINING_STATE) & set(best) and {"optimizer", "lr_scheduler"} <= set(last)
    assert best["model"].keys() == last["model"].keys() and best["epoch"] == 1 and best["args"]["optimizer"] == "adamw"
    weights = sum(t.numel() * t.element_size() for t in best["model"].values())
    assert os.path.getsize(tmp_path / "runs" / "slim" / "best.pth") < 1.05 * weights + 200_000


def test_train_options_are_exactly_the_scripts_options():
    """Every field of TrainOptions is an option of train.py (a misspelt field fails here, not deep inside a run),
    and every option that shapes a run is saved in args.json (TrainOptions.flat), so --config repeats it."""
    import dataclasses

    import train
    from utils.training import TrainOptions

    def names(spec):
        for field in dataclasses.fields(spec):
            yield from (names(field.type) if dataclasses.is_dataclass(field.type) else [field.name])

    dests = {action.dest for action in train.get_args_parser()._actions} - {"help", "config", "quiet"}
    assert sorted(names(TrainOptions)) == sorted(dests)
