"""Issue 20, fault injection (the SQLite way): the disk fills up at the Nth write of each entry point's save paths
(checkpoint via torch.save, workbook via openpyxl, CSV, PNG via matplotlib and PIL, ONNX, the study manifest). Every
run must end with one stderr line naming the file and the cause, exit status 2, no "Exception ignored" noise, no
temporary left, every file that was there before byte-identical (unless the run had already replaced it completely
before the disk filled), and the same command must succeed once space is freed.

No real full disk is needed: `open` (builtins and io) hands out files whose writes fail with ENOSPC once the disk
is "full", half-writing the write that fills it, and torch.save (whose C++ writer Python cannot reach) fails as it
does on a real full disk: a RuntimeError "unexpected pos" without an errno.
"""
import builtins
import errno
import gc
import io
import os
import shutil
import sys

import pytest
import torch

import export
import inference
import study
import test as test_script
import torchvision_pruning
import train
from utils.cli import UserError, run_main

MOBILENET = ["--arch", "deeplabv3_mobilenet_v3_large"]
TRAIN = ["--batch_size", "2", "--crop_size", "64", "--init", "none", "--device", "cpu", "--workers", "0",
         "--epochs", "1", *MOBILENET]


class FullDisk:
    """A disk that fills up when the Nth file whose name ends with one of `kinds` is written, and stays full until
    free(). Records the targets that were moved into place (os.replace) while it had room."""

    def __init__(self):
        self.countdown, self.kinds, self.full, self.replaced = None, (), False, []

    def fill_at(self, count, *kinds):
        self.countdown, self.kinds, self.full, self.replaced = count, kinds, False, []

    def free(self):
        self.countdown, self.full = None, False

    def opened_for_writing(self, path):
        """Whether this new file's first write fills the disk."""
        if self.full or self.countdown is None or not str(path).endswith(self.kinds):
            return False
        self.countdown -= 1
        return self.countdown == 0


class DiskFile:
    """A writable file on the FullDisk: the write that fills the disk lands half, then ENOSPC, and so does every
    later write. No fileno(), so PIL writes through write() instead of the descriptor."""

    def __init__(self, real, disk, fills):
        self._real, self._disk, self._fills = real, disk, fills

    def write(self, data):
        if self._fills or self._disk.full:
            if self._fills:
                self._real.write(data[:len(data) // 2])
            self._fills, self._disk.full = False, True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._real.write(data)

    def fileno(self):
        raise io.UnsupportedOperation("fileno")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return iter(self._real)

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
def disk(monkeypatch):
    """Installs the FullDisk; also records every unraisable exception (a finaliser's 'Exception ignored')."""
    state = FullDisk()
    real_open, real_save, real_replace = builtins.open, torch.save, os.replace

    def faulty_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, (str, bytes, os.PathLike)) or not set(mode) & set("wax+"):
            return handle
        return DiskFile(handle, state, state.opened_for_writing(os.fspath(file)))

    def faulty_save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        failed = False
        try:
            with faulty_open(f, "wb") as handle:
                for start in range(0, buffer.tell(), 1 << 16):
                    handle.write(buffer.getbuffer()[start:start + (1 << 16)].tobytes())
        except OSError:
            failed = True
        if failed:  # raised outside the handler: like torch, nothing says it was ENOSPC
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    def recording_replace(source, target, *args, **kwargs):
        real_replace(source, target, *args, **kwargs)
        if not state.full:
            state.replaced.append(os.path.abspath(target))

    monkeypatch.setattr(builtins, "open", faulty_open)
    monkeypatch.setattr(io, "open", faulty_open)
    monkeypatch.setattr(torch, "save", faulty_save)
    monkeypatch.setattr(os, "replace", recording_replace)
    state.unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", state.unraisable.append)
    return state


def snapshot(root):
    """{absolute path: bytes} of every file under root."""
    return {os.path.join(folder, name): open(os.path.join(folder, name), "rb").read()
            for folder, _, names in os.walk(root) for name in names}


def fails_in_one_line(capsys, disk, main, argv, root):
    """Run main through the funnel on the filling disk; check the line, the exit, the noise and the files."""
    before = snapshot(root)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_main(main, list(map(str, argv)))
    gc.collect()  # a file a failed writer left open would complain now
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2, err
    assert len(lines) == 1, err
    assert "disk is full" in lines[0] and "run the same command again" in lines[0], lines[0]
    assert "Exception ignored" not in err and not disk.unraisable, (err, disk.unraisable)
    assert disk.full, "the run ended before the disk filled: the fault was not injected"
    after = snapshot(root)
    assert not [path for path in after if os.path.basename(path).startswith(".tmp_")], sorted(after)
    for path, content in before.items():
        if path not in disk.replaced:
            assert after.get(path) == content, f"{path} changed although the run never replaced it"
    return lines[0]


def succeeds_after_freeing(disk, main, argv):
    disk.free()
    main(list(map(str, argv)))
    assert not disk.unraisable


# --- each writer alone: the funnel's part, in seconds -----------------------------------------------------------

def _writers():
    """(kind, write(path)) for every library a save path goes through."""
    import numpy as np
    import pandas as pd

    from utils.checkpoint import save_atomic
    from utils.inference import save_png
    from utils.report import Table, plot_curves, write_csv, write_workbook
    from utils.study.manifest import save_manifest

    curves = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_miou": 0.1, "val_pixel_acc": 0.5, "lr": 0.01}]
    return {
        "torch.save": (".pth", lambda path: save_atomic({"weights": torch.zeros(50000)}, path)),
        "openpyxl": (".xlsx", lambda path: write_workbook(path, {"s": [Table(pd.DataFrame({"a": range(3000)}))]})),
        "csv": (".csv", lambda path: write_csv([{"a": i} for i in range(3000)], path)),
        "matplotlib": (".png", lambda path: plot_curves(curves, path)),
        "PIL": (".png", lambda path: save_png(np.arange(4096, dtype=np.uint8).reshape(64, 64), path)),
        "manifest": (".json", lambda path: save_manifest(os.path.dirname(path), {"variants": list(range(3000))})),
        "onnx": (".onnx", lambda path: torch.onnx.export(torch.nn.Linear(64, 64), (torch.zeros(1, 64),), path,
                                                        dynamo=False)),
    }


@pytest.mark.parametrize("library", ["torch.save", "openpyxl", "csv", "matplotlib", "PIL", "manifest"])
def test_each_writer_on_a_filling_disk(tmp_path, disk, capsys, library):
    kind, write = _writers()[library]
    target = tmp_path / ("study.json" if library == "manifest" else f"output{kind}")
    target.write_bytes(b"the earlier output")
    (tmp_path / "notes.txt").write_text("mine")
    disk.fill_at(1, kind)
    line = fails_in_one_line(capsys, disk, lambda argv: write(str(target)), [], tmp_path)
    assert str(target) in line
    succeeds_after_freeing(disk, lambda argv: write(str(target)), [])
    assert target.read_bytes() != b"the earlier output"


def test_onnx_export_on_a_filling_disk_one_line_without_a_path(tmp_path, disk, capsys):
    """ONNX written straight by torch.onnx (not through replace_atomically) still comes out as one line."""
    kind, write = _writers()["onnx"]
    disk.fill_at(1, kind)
    fails_in_one_line(capsys, disk, lambda argv: write(str(tmp_path / "graph.onnx")), [], tmp_path)


# --- train.py, fresh and resumed -----------------------------------------------------------------------------

@pytest.mark.parametrize("count, kind, rerun", [
    (1, ".json", []),                     # args.json, the first write: nothing of the run exists yet
    (1, ".pth", []),                      # last.pth of epoch 1: no checkpoint of the run exists yet
    (2, ".pth", ["--resume", "--epochs", "2"]),  # best.pth, after last.pth: resuming restores it from last.pth
    (1, ".png", ["--resume", "--epochs", "2"]),  # curves.png via matplotlib, after both checkpoints and metrics.csv
])
def test_train_on_a_filling_disk(tmp_path, dataset_dir, disk, capsys, count, kind, rerun):
    out = tmp_path / "out"
    (out / "runs" / "run").mkdir(parents=True)
    (out / "runs" / "run" / "my_notes.txt").write_text("mine")
    argv = [dataset_dir / "train", dataset_dir / "val", "run", *TRAIN, "--output_dir", out]
    disk.fill_at(count, kind)
    line = fails_in_one_line(capsys, disk, train.main, argv, out)
    assert kind in line and str(out / "runs" / "run") in line
    succeeds_after_freeing(disk, train.main, argv + rerun)
    assert (out / "runs" / "run" / "best.pth").is_file() and (out / "runs" / "run" / "curves.png").is_file()


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, dataset_dir):
    """OUTPUT_DIR holding runs/run after one epoch, to be copied by the tests that resume it."""
    out = tmp_path_factory.mktemp("one_epoch") / "out"
    train.main(list(map(str, [dataset_dir / "train", dataset_dir / "val", "run", *TRAIN, "--output_dir", out])))
    return out


@pytest.mark.parametrize("count, kind", [(1, ".pth"), (2, ".pth"), (1, ".csv")])
def test_resumed_train_on_a_filling_disk_keeps_the_resumable_run(tmp_path, dataset_dir, one_epoch_run, disk, capsys,
                                                                 count, kind):
    out = tmp_path / "out"
    shutil.copytree(one_epoch_run, out)
    argv = [dataset_dir / "train", dataset_dir / "val", "run", *TRAIN, "--output_dir", out, "--resume", "--epochs", "2"]
    disk.fill_at(count, kind)
    fails_in_one_line(capsys, disk, train.main, argv, out)
    assert torch.load(out / "runs" / "run" / "last.pth", weights_only=True)["epoch"] >= 1
    succeeds_after_freeing(disk, train.main, argv)
    assert torch.load(out / "runs" / "run" / "last.pth", weights_only=True)["epoch"] == 2


# --- torchvision_pruning.py, test.py, export.py, inference.py, study.py ---------------------------------------

@pytest.mark.parametrize("kind", [".pth", ".csv"])
def test_pruning_on_a_filling_disk(tmp_path, mobilenet_checkpoint, dataset_dir, disk, capsys, kind):
    out = tmp_path / "out"
    common = ["--pruning_ratio", "30", "--importance_type", "Magnitude", "--device", "cpu", "--workers", "0",
              "--latency_runs", "0", "--measure_size", "64", "--output_dir", out]
    torchvision_pruning.main(list(map(str, ["--state_dict", mobilenet_checkpoint, *common, "--model_name", "earlier"])))
    argv = ["--state_dict", mobilenet_checkpoint, *common, "--model_name", "faulted"]
    disk.fill_at(1, kind)
    line = fails_in_one_line(capsys, disk, torchvision_pruning.main, argv, out)
    assert "faulted" in line
    succeeds_after_freeing(disk, torchvision_pruning.main, argv)
    assert (out / "pruned" / "faulted.pth").is_file()


@pytest.mark.parametrize("count, kind, rerun", [
    (1, ".xlsx", []),                 # the report workbook (openpyxl: its ZipFile is left open)
    (1, ".png", []),                  # the confusion plot, after the report
    (2, ".xlsx", ["--overwrite"]),    # the comparison workbook's new row, after the report was written
])
def test_test_py_on_a_filling_disk(tmp_path, mobilenet_checkpoint, dataset_dir, disk, capsys, count, kind, rerun):
    out = tmp_path / "out"
    common = [dataset_dir / "test", "--weights", mobilenet_checkpoint, "--device", "cpu", "--workers", "0",
              "--output_dir", out]
    test_script.main(list(map(str, common + ["--name", "earlier"])))
    argv = common + ["--name", "faulted", "--save_predictions"]
    disk.fill_at(count, kind)
    fails_in_one_line(capsys, disk, test_script.main, argv, out)
    assert not (out / "test" / "faulted_predictions").exists() or rerun
    succeeds_after_freeing(disk, test_script.main, argv + rerun)
    assert (out / "test" / "faulted.xlsx").stat().st_size > 0


def test_export_on_a_filling_disk(tmp_path, mobilenet_checkpoint, disk, capsys):
    out = tmp_path / "out"
    (out / "export").mkdir(parents=True)
    (out / "export" / "earlier.onnx").write_bytes(b"an earlier graph")
    argv = [mobilenet_checkpoint, "--size", "64", "--device", "cpu", "--output_dir", out]
    disk.fill_at(1, ".onnx")
    line = fails_in_one_line(capsys, disk, export.main, argv, out)
    assert ".onnx" in line
    succeeds_after_freeing(disk, export.main, argv)


def test_inference_masks_on_a_filling_disk(tmp_path, mobilenet_checkpoint, dataset_dir, disk, capsys):
    out = tmp_path / "out"
    argv = ["--state_dict", mobilenet_checkpoint, "--image", dataset_dir / "test" / "Images", "--mode", "save_mask",
            "overlay", "--save_figure", "--device", "cpu", "--output_dir", out, "--name", "m"]
    inference.main(list(map(str, argv)))
    disk.fill_at(2, ".png")  # the second mask of the first photo (PIL)
    fails_in_one_line(capsys, disk, inference.main, argv, out)
    succeeds_after_freeing(disk, inference.main, argv)


@pytest.mark.parametrize("count, kind", [(1, ".json"), (1, ".pth"), (1, ".xlsx"), (1, ".png")])
def test_study_on_a_filling_disk(tmp_path, mobilenet_checkpoint, dataset_dir, disk, capsys, count, kind):
    out = tmp_path / "out"
    argv = ["--state_dict", mobilenet_checkpoint, "--data", dataset_dir / "train", "--val_data", dataset_dir / "val",
            "--test_data", dataset_dir / "test", "--pruning_ratio", "30", "--importance_type", "Magnitude",
            "--finetune_steps", "0", "--calib_batches", "1", "--batch_size", "2", "--crop_size", "64",
            "--measure_size", "64", "--latency_runs", "0", "--workers", "0", "--device", "cpu", "--name", "grid",
            "--output_dir", out]
    disk.fill_at(count, kind)
    fails_in_one_line(capsys, disk, study.main, argv, out)
    succeeds_after_freeing(disk, study.main, argv)
    assert (out / "studies" / "grid" / "study.xlsx").is_file()
